"""Triton photometric chain: colour jitter (per-sample order), grayscale, blur, solarize, normalise.

Four launches, each over all N samples (no host sync: samples skip work by their own flags):

1. ``_stats_kernel`` (N x pixel blocks): contrast blends with the mean gray of the image *as it
   is when contrast runs*, so this pass applies the jitter ops that precede contrast in each
   sample's order and writes per-block partial sums of the gray image (floored for uint8).
   Partial sums are added in a fixed order by the next pass: deterministic, no atomics.
2. ``_pointwise_kernel`` (N x pixel blocks): jitter in order, grayscale; an unblurred sample is
   finished here (solarize, normalise, store); a blurred one is parked unfinished in the output
   (float32 or uint8 levels hold it exactly; half outputs use a float32 scratch).
3. ``_blur_rows_kernel`` / 4. ``_blur_cols_kernel`` (N x 3 x tiles, blurred samples only): the
   separable blur as two 1-D passes through a float32 intermediate, reflect padding; the column
   pass rounds uint8, solarizes, normalises and stores. Two 1-D passes cost about 2K loads and
   FMAs per pixel; a one-kernel 2-D tile (row loop + rank-1 updates) needed ~6x the instructions
   (SASS count, sm_90), more than the intermediate's extra 8 bytes per pixel of traffic.

Traffic per element: one read of the views (two where contrast needs the pre-pass), one write;
blurred samples add the parked write and its reads, and the intermediate's write and reads
(L1/L2 hits within a tile). Reading the views through their strides makes channels_last work
in place. Oracle: ``effssl_kernels.reference.photometric.photometric_reference``; packed layout:
``effssl_kernels.ops.photometric.pack_params``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import photometric as _layout
from ..ops.photometric import empty_out
from . import device_of, wrap_triton

_BLOCK = 1024  # pixels per program of the pointwise passes
_STATS_BLOCK = 4096
_R, _BW = 16, 64  # rows x columns of a blur program's tile

# Columns of a packed parameter row (ops/photometric.py owns the layout).
_NCOL = tl.constexpr(_layout.NUM_COLS)
_BRIGHTNESS = tl.constexpr(_layout.BRIGHTNESS)
_CONTRAST = tl.constexpr(_layout.CONTRAST)
_SATURATION = tl.constexpr(_layout.SATURATION)
_HUE = tl.constexpr(_layout.HUE)
_ORDER = tl.constexpr(_layout.ORDER)
_JITTER = tl.constexpr(_layout.JITTER)
_GRAY = tl.constexpr(_layout.GRAY)
_BLUR = tl.constexpr(_layout.BLUR)
_SOLARIZE = tl.constexpr(_layout.SOLARIZE)
_THRESHOLD = tl.constexpr(_layout.THRESHOLD)


@triton.jit
def _finish(v, IS_U8: tl.constexpr):
    """Clamp to the dtype's range; uint8 intermediates truncate to a level (torchvision's .to(uint8))."""
    # PTX min/max drop a NaN operand; torch's clamp keeps NaN (uint8 has none to keep)
    if IS_U8:
        v = tl.floor(tl.minimum(tl.maximum(v, 0.0), 255.0))
    else:
        v = tl.minimum(tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)
    return v


@triton.jit
def _gray(r, g, b, IS_U8: tl.constexpr):
    y = tl.fma(b, 0.114, tl.fma(g, 0.587, r * 0.2989))
    if IS_U8:
        y = tl.floor(y)
    return y


@triton.jit
def _blend(x, other, ratio, IS_U8: tl.constexpr):
    # torchvision: x * ratio + other * (1 - ratio), one rounding of the sum (its fused add).
    return _finish(tl.fma(other, 1.0 - ratio, x * ratio), IS_U8)


@triton.jit
def _hue(r, g, b, shift, IS_U8: tl.constexpr):
    """torchvision's _rgb_to_hsv -> (h + shift) mod 1 -> _hsv_to_rgb, op for op."""
    if IS_U8:
        r = r * (1.0 / 255)
        g = g * (1.0 / 255)
        b = b * (1.0 / 255)
    else:
        # torch's max over channels makes a pixel with one NaN channel NaN in all three; PTX
        # min/max drop NaN operands, so mark it (r + g + b) and write NaN back at the end
        poison = r + g + b
        nan_px = poison != poison
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / tl.where(eqc, 1.0, maxc)
    crd = tl.where(eqc, 1.0, cr)
    rc = (maxc - r) / crd
    gc = (maxc - g) / crd
    bc = (maxc - b) / crd
    h = tl.where(maxc == r, bc - gc, tl.where(maxc == g, (rc + 2.0) - bc, (gc + 4.0) - rc))
    h = h * (1.0 / 6.0) + 1.0
    h = h - tl.floor(h)  # fmod(h, 1) for h >= 0
    h = h + shift
    h = h - tl.floor(h)  # remainder(h, 1)
    if not IS_U8:
        # an infinite channel makes s or h NaN (inf / inf), which torch carries into all three
        # channels; the clamps below (min/max) would drop it
        nan_px = nan_px | (s != s) | (h != h)
    h6 = h * 6.0
    fi = tl.floor(h6)
    f = h6 - fi
    i = fi.to(tl.int32) % 6
    sxf = s * f
    oms = 1.0 - s
    q = tl.minimum(tl.maximum((1.0 - sxf) * maxc, 0.0), 1.0)
    t = tl.minimum(tl.maximum((sxf + oms) * maxc, 0.0), 1.0)
    p = tl.minimum(tl.maximum(oms * maxc, 0.0), 1.0)
    v = maxc
    r = tl.where(i == 0, v, tl.where(i == 1, q, tl.where((i == 2) | (i == 3), p, tl.where(i == 4, t, v))))
    g = tl.where(i == 0, t, tl.where((i == 1) | (i == 2), v, tl.where(i == 3, q, p)))
    b = tl.where(i <= 1, p, tl.where(i == 2, t, tl.where(i == 5, q, v)))
    if not IS_U8:
        r = tl.where(nan_px, float("nan"), r)
        g = tl.where(nan_px, float("nan"), g)
        b = tl.where(nan_px, float("nan"), b)
    if IS_U8:
        r = tl.floor(r * 255.999)
        g = tl.floor(g * 255.999)
        b = tl.floor(b * 255.999)
    return r, g, b


@triton.jit
def _jitter_op(op, r, g, b, prm, mean, IS_U8: tl.constexpr):
    """Run jitter op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) of row ``prm``."""
    if op == 0:
        f = tl.load(prm + _BRIGHTNESS)
        r = _finish(r * f, IS_U8)
        g = _finish(g * f, IS_U8)
        b = _finish(b * f, IS_U8)
    elif op == 1:
        c = tl.load(prm + _CONTRAST)
        m = tl.zeros_like(r) + mean
        r = _blend(r, m, c, IS_U8)
        g = _blend(g, m, c, IS_U8)
        b = _blend(b, m, c, IS_U8)
    elif op == 2:
        s = tl.load(prm + _SATURATION)
        y = _gray(r, g, b, IS_U8)
        r = _blend(r, y, s, IS_U8)
        g = _blend(g, y, s, IS_U8)
        b = _blend(b, y, s, IS_U8)
    else:
        shift = tl.load(prm + _HUE)
        if shift != 0.0:  # ColorJitter skips a zero hue shift
            r, g, b = _hue(r, g, b, shift, IS_U8)
    return r, g, b


@triton.jit
def _load_rgb(x_ptr, n, y, x, live, sn, sc, sh, sw):
    """Pixels (y, x) of sample n, 3 channels, as float32. Offsets within an image are int32 (the
    wrapper checks they fit): 64-bit index math costs two instructions per op."""
    base = x_ptr + n * sn + (y * sh + x * sw)
    r = tl.load(base, mask=live, other=0).to(tl.float32)
    g = tl.load(base + sc, mask=live, other=0).to(tl.float32)
    b = tl.load(base + 2 * sc, mask=live, other=0).to(tl.float32)
    return r, g, b


@triton.jit
def _stats_kernel(x_ptr, prm_ptr, part_ptr, HW, W, NB, sn, sc, sh, sw,
                  NBP: tl.constexpr, IS_U8: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // NB
    blk = (pid - n * NB).to(tl.int32)
    prm = prm_ptr + n * _NCOL
    total = tl.zeros([], dtype=tl.float32)
    if tl.load(prm + _JITTER) != 0.0:
        o1 = tl.load(prm + _ORDER + 1)
        o2 = tl.load(prm + _ORDER + 2)
        o3 = tl.load(prm + _ORDER + 3)
        cslot = tl.where(o1 == 1.0, 1, 0) + tl.where(o2 == 1.0, 2, 0) + tl.where(o3 == 1.0, 3, 0)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        live = offs < HW
        y = offs // W
        r, g, b = _load_rgb(x_ptr, n, y, offs - y * W, live, sn, sc, sh, sw)
        # runtime loops (not static_range): one inlined copy of the jitter ops, not four
        for slot in range(cslot):
            op = tl.load(prm + _ORDER + slot).to(tl.int32)
            r, g, b = _jitter_op(op, r, g, b, prm, 0.0, IS_U8)
        total = tl.sum(tl.where(live, _gray(r, g, b, IS_U8), 0.0))
    tl.store(part_ptr + n * NBP + blk, total)


@triton.jit
def _epilogue(v, c, prm, norm_ptr, IS_U8: tl.constexpr, HAS_NORM: tl.constexpr):
    """Solarize (where flagged), then normalise."""
    thr = tl.load(prm + _THRESHOLD)
    if IS_U8:
        thr = thr * 255.0
        inv = 255.0 - v
    else:
        inv = 1.0 - v
    if tl.load(prm + _SOLARIZE) != 0.0:
        v = tl.where(v >= thr, inv, v)
    if HAS_NORM:
        if IS_U8:
            v = v * (1.0 / 255)
        v = (v - tl.load(norm_ptr + c)) / tl.load(norm_ptr + 3 + c)
    return v


@triton.jit
def _pointwise_kernel(x_ptr, prm_ptr, part_ptr, norm_ptr, scr_ptr, out_ptr, HW, W, NB,
                      sn, sc, sh, sw, qn, qc, qh, qw, on, oc, oh, ow,
                      NBP: tl.constexpr, IS_U8: tl.constexpr,
                      HAS_NORM: tl.constexpr, SCRATCH_IS_OUT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // NB
    offs = (pid - n * NB).to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
    live = offs < HW
    y = offs // W
    x = offs - y * W
    prm = prm_ptr + n * _NCOL
    r, g, b = _load_rgb(x_ptr, n, y, x, live, sn, sc, sh, sw)
    if tl.load(prm + _JITTER) != 0.0:
        mean = tl.sum(tl.load(part_ptr + n * NBP + tl.arange(0, NBP))) / HW
        # a runtime loop (not static_range): one inlined copy of the jitter ops, not four
        for slot in range(4):
            op = tl.load(prm + _ORDER + slot).to(tl.int32)
            r, g, b = _jitter_op(op, r, g, b, prm, mean, IS_U8)
    if tl.load(prm + _GRAY) != 0.0:
        lum = _gray(r, g, b, IS_U8)
        r = lum
        g = lum
        b = lum
    if tl.load(prm + _BLUR) != 0.0:  # blurred: the blur passes finish this sample
        if SCRATCH_IS_OUT:  # (not the same tensor passed twice: torch.compile clones each arg)
            o = out_ptr + n * on + (y * oh + x * ow)
            tl.store(o, r.to(out_ptr.dtype.element_ty), mask=live)
            tl.store(o + oc, g.to(out_ptr.dtype.element_ty), mask=live)
            tl.store(o + 2 * oc, b.to(out_ptr.dtype.element_ty), mask=live)
        else:
            s = scr_ptr + n * qn + (y * qh + x * qw)
            tl.store(s, r, mask=live)
            tl.store(s + qc, g, mask=live)
            tl.store(s + 2 * qc, b, mask=live)
    else:
        o = out_ptr + n * on + (y * oh + x * ow)
        ty = out_ptr.dtype.element_ty
        tl.store(o, _epilogue(r, 0, prm, norm_ptr, IS_U8, HAS_NORM).to(ty), mask=live)
        tl.store(o + oc, _epilogue(g, 1, prm, norm_ptr, IS_U8, HAS_NORM).to(ty), mask=live)
        tl.store(o + 2 * oc, _epilogue(b, 2, prm, norm_ptr, IS_U8, HAS_NORM).to(ty), mask=live)


@triton.jit
def _reflect(i, n):
    """Reflect padding without edge repeat (-1 -> 1, n -> n - 2), then clamp: indices more than
    one reflection away only feed outputs outside the image, which are never stored."""
    i = tl.where(i < 0, -i, i)
    i = tl.where(i >= n, 2 * n - 2 - i, i)
    return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def _round_half_even(v):
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def _tile(pid, TY, TX, R: tl.constexpr, BW: tl.constexpr):
    """Program ``pid`` -> (n, c, rows [R], cols [BW]) of an (n * 3 + c, row block, col block)
    grid. Rows and columns are int32 (64-bit index math costs two instructions per op): offsets
    within one image plane fit, the wrapper checks."""
    tiles = TY * TX
    nc = pid // tiles
    t = (pid - nc * tiles).to(tl.int32)
    ty = t // TX
    n = nc // 3
    rows = ty * R + tl.arange(0, R)
    cols = (t - ty * TX) * BW + tl.arange(0, BW)
    return n, nc - n * 3, rows, cols


@triton.jit
def _blur_rows_kernel(src_ptr, prm_ptr, w_ptr, tmp_ptr, H, W, TY, TX, qn, qc, qh, qw,
                      K: tl.constexpr, R: tl.constexpr, BW: tl.constexpr):
    """Horizontal pass of blurred samples: tmp [N, 3, H, W] float32 = the K-tap row blur of src."""
    PAD: tl.constexpr = K // 2
    pid = tl.program_id(0).to(tl.int64)
    n, c, rows, cols = _tile(pid, TY, TX, R, BW)
    if tl.load(prm_ptr + n * _NCOL + _BLUR) != 0.0:
        # rows past the image are clamped (their results are not stored); the column taps
        # reflect, so every load is inside the image
        src = src_ptr + n * qn + c * qc + (tl.minimum(rows, H - 1) * qh)[:, None]
        acc = tl.zeros([R, BW], dtype=tl.float32)
        # unrolled by 4, not fully: Triton 3.6 hoists all K taps' loads of a full unroll (168
        # registers at K = 23, against 80 here; python_tests/test_triton_gpu_ir.py checks)
        for k in tl.range(0, K, loop_unroll_factor=4):
            cc = _reflect(cols + (k - PAD), W)
            acc += tl.load(w_ptr + n * K + k) * tl.load(src + (cc * qw)[None, :]).to(tl.float32)
        live = (rows[:, None] < H) & (cols[None, :] < W)
        tl.store(tmp_ptr + (n * 3 + c) * H * W + (rows[:, None] * W + cols[None, :]), acc, mask=live)


@triton.jit
def _blur_cols_kernel(tmp_ptr, prm_ptr, w_ptr, norm_ptr, out_ptr, H, W, TY, TX, on, oc, oh, ow,
                      K: tl.constexpr, IS_U8: tl.constexpr, HAS_NORM: tl.constexpr,
                      R: tl.constexpr, BW: tl.constexpr):
    """Vertical pass of blurred samples from tmp, rounded for uint8, then solarize and normalise."""
    PAD: tl.constexpr = K // 2
    pid = tl.program_id(0).to(tl.int64)
    n, c, rows, cols = _tile(pid, TY, TX, R, BW)
    prm = prm_ptr + n * _NCOL
    if tl.load(prm + _BLUR) != 0.0:
        col_live = cols[None, :] < W
        src = tmp_ptr + (n * 3 + c) * H * W + cols[None, :]
        acc = tl.zeros([R, BW], dtype=tl.float32)
        for k in tl.static_range(K):
            rr = _reflect(rows + (k - PAD), H)
            v = tl.load(src + (rr * W)[:, None], mask=col_live, other=0.0)
            acc += tl.load(w_ptr + n * K + k) * v
        if IS_U8:
            acc = _round_half_even(acc)
        acc = _epilogue(acc, c, prm, norm_ptr, IS_U8, HAS_NORM)
        o = out_ptr + n * on + c * oc + (rows[:, None] * oh + cols[None, :] * ow)
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < H) & col_live)


def photometric_fwd(views: Tensor, params: Tensor, blur_weights: Tensor, norm: Optional[Tensor]) -> Tensor:
    """views [N, 3, H, W] (any strides), params float32 [N, 13], blur_weights float32 [N, K],
    norm float32 [2, 3] or None -> [N, 3, H, W] (ops/photometric.py states dtype and layout)."""
    N, _, H, W = views.shape
    out = empty_out(views, norm is not None)
    if out.numel() == 0:
        return out
    views = fit_int32_offsets(views, out)
    with device_of(views):  # launch on the views' GPU, not the current one
        return _launch(views, params, blur_weights, norm, out)


def _max_offset(t: Tensor) -> int:
    """The largest offset within one sample that the kernels form in int32: pixel (H-1, W-1) of
    channel 2 (strides are never negative in torch)."""
    _, _, H, W = t.shape
    _, sc, sh, sw = t.stride()
    return (H - 1) * sh + (W - 1) * sw + 2 * sc


def fit_int32_offsets(views: Tensor, out: Tensor) -> Tensor:
    """The kernels index within one sample in int32 (64-bit index math costs two instructions per
    op); sample offsets are int64. Views whose strides overflow int32 (a small crop of a huge
    tensor) are copied contiguous; a sample too large even then raises."""
    if _max_offset(views) >= 2**31:
        views = views.contiguous()
    _, _, H, W = views.shape
    if max(_max_offset(views), _max_offset(out), 3 * H * W) >= 2**31:
        raise ValueError(f"photometric: views of {H}x{W} px are too large for the Triton kernels "
                         "(more than 2^31 elements per sample)")
    return views


def _launch(views: Tensor, params: Tensor, blur_weights: Tensor, norm: Optional[Tensor], out: Tensor) -> Tensor:
    N, _, H, W = views.shape
    is_u8 = views.dtype == torch.uint8
    HW = H * W
    K = blur_weights.shape[1]
    params = params.contiguous()
    blur_weights = blur_weights.contiguous()
    has_norm = norm is not None
    norm_t = norm.contiguous() if has_norm else params  # a placeholder pointer when unused
    nb_stats = triton.cdiv(HW, _STATS_BLOCK)
    nbp = triton.next_power_of_2(nb_stats)
    part = torch.zeros((N, nbp), dtype=torch.float32, device=views.device)
    sn, sc, sh, sw = views.stride()
    on, oc, oh, ow = out.stride()
    wrap = wrap_triton  # so torch.compile sees what each launch reads and writes
    wrap(_stats_kernel)[(N * nb_stats,)](views, params, part, HW, W, nb_stats, sn, sc, sh, sw,
                                   NBP=nbp, IS_U8=is_u8, BLOCK=_STATS_BLOCK, num_warps=8)
    # Blurred samples park their pre-blur values in the output where it holds them exactly
    # (float32, or uint8 levels); half outputs need a float32 scratch.
    in_out = out.dtype in (torch.float32, torch.uint8)
    scratch = out if in_out else torch.empty((N, 3, H, W), dtype=torch.float32, device=views.device)
    qn, qc, qh, qw = scratch.stride()
    nb = triton.cdiv(HW, _BLOCK)
    wrap(_pointwise_kernel)[(N * nb,)](views, params, part, norm_t, params if in_out else scratch, out, HW, W, nb,
                                       sn, sc, sh, sw, qn, qc, qh, qw, on, oc, oh, ow,
                                       NBP=nbp, IS_U8=is_u8, HAS_NORM=has_norm,
                                       SCRATCH_IS_OUT=in_out, BLOCK=_BLOCK, num_warps=4)
    tmp = torch.empty((N, 3, H, W), dtype=torch.float32, device=views.device)
    ty, tx = triton.cdiv(H, _R), triton.cdiv(W, _BW)
    grid = (N * 3 * ty * tx,)
    wrap(_blur_rows_kernel)[grid](scratch, params, blur_weights, tmp, H, W, ty, tx, qn, qc, qh, qw,
                                  K=K, R=_R, BW=_BW, num_warps=4)
    wrap(_blur_cols_kernel)[grid](tmp, params, blur_weights, norm_t, out, H, W, ty, tx, on, oc, oh, ow,
                                  K=K, IS_U8=is_u8, HAS_NORM=has_norm, R=_R, BW=_BW,
                                  num_warps=4)
    return out
