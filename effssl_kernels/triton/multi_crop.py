"""Triton multi_crop: crop-resize-flip of many boxes per image in one launch.

One program per (box, block of ``BLOCK`` output pixels), on a 1-D grid: it computes the bilinear taps of its
pixels once (torch's ``upsample_bilinear2d`` arithmetic on the crop, as the reference) and loops
over the channels, so the index math is paid once per pixel, not per channel. The operations are
the reference's, in its order; on a GPU the compiler contracts multiply-adds into FMAs, so outputs
differ from the reference by float rounding (~1 ulp; a uint8 output by one level where the value
sits on a .5 boundary), while under the interpreter they are exact. Images are read
through their strides (any layout, int64 offsets); taps outside the image read nothing and
count 0. The output is contiguous ``[N*P, C, oh, ow]``. SEMANTICS.md section 4; oracle
``effssl_kernels.reference.multi_crop.multi_crop_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import check_grid, device_of, wrap_triton


@triton.jit
def _axis_taps(start, size, scale, o, limit):
    """Taps of output positions ``o`` along one axis of boxes ``(start, size)`` with ``scale =
    size / n_out``: (i0, i1, w0, w1, valid0, valid1); the reference's formulas, in float32."""
    s = scale * (o.to(tl.float32) + 0.5) - 0.5
    s = tl.maximum(s, 0.0)
    s = tl.minimum(s, tl.maximum(size - 1.0, 0.0))
    fs = tl.floor(start)
    u = s + (start - fs)
    k = tl.floor(u)
    w1 = u - k
    w0 = 1.0 - w1
    i0 = (tl.minimum(tl.maximum(fs + k, -1e9), 1e9)).to(tl.int64)
    i1 = i0 + 1
    v0 = (i0 >= 0) & (i0 < limit)
    v1 = (i1 >= 0) & (i1 < limit) & (w1 != 0.0)
    return i0, i1, w0, w1, v0, v1


@triton.jit
def _multi_crop_kernel(
    img_ptr,  # [N, C, H, W], strides s*
    box_ptr,  # float32 [N*P, 6] contiguous: top, left, height, width, height / OH, width / OW
    flip_ptr,  # bool/int8 [N*P] contiguous
    out_ptr,  # [N*P, C, OH, OW] contiguous
    P,
    C,
    H,
    W,
    OH,
    OW,
    sn,
    sc,
    sh,
    sw,
    OUT_U8: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # A 1-D grid (box-major): grid dims 1 and 2 stop at 65535, which N*P or large outputs pass.
    n_pix = tl.cast(OH, tl.int64) * OW  # int64: OH * OW passes 2^31 for sides past 46340
    n_blocks = tl.cdiv(n_pix, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    q = pid // n_blocks  # box index n * P + p
    offs = (pid - q * n_blocks) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n_pix
    oy = offs // OW
    ox = offs - oy * OW
    box = box_ptr + q * 6
    top = tl.load(box)
    left = tl.load(box + 1)
    bh = tl.load(box + 2)
    bw = tl.load(box + 3)
    flip = tl.load(flip_ptr + q) != 0
    ox = tl.where(flip, OW - 1 - ox, ox)  # column x reads the taps of column OW - 1 - x
    y0, y1, wy0, wy1, vy0, vy1 = _axis_taps(top, bh, tl.load(box + 4), oy, H)
    x0, x1, wx0, wx1, vx0, vx1 = _axis_taps(left, bw, tl.load(box + 5), ox, W)
    m00 = live & vy0 & vx0
    m01 = live & vy0 & vx1
    m10 = live & vy1 & vx0
    m11 = live & vy1 & vx1
    base = img_ptr + (q // P) * sn
    p00 = base + y0 * sh + x0 * sw
    p01 = base + y0 * sh + x1 * sw
    p10 = base + y1 * sh + x0 * sw
    p11 = base + y1 * sh + x1 * sw
    o_ptr = out_ptr + q * C * n_pix + offs
    for c in range(C):
        c64 = tl.full([], c, tl.int64)  # int64: (C - 1) * sc and C * n_pix pass 2^31 on huge images
        cc = c64 * sc
        v00 = tl.load(p00 + cc, mask=m00, other=0.0).to(tl.float32)
        v01 = tl.load(p01 + cc, mask=m01, other=0.0).to(tl.float32)
        v10 = tl.load(p10 + cc, mask=m10, other=0.0).to(tl.float32)
        v11 = tl.load(p11 + cc, mask=m11, other=0.0).to(tl.float32)
        v = wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)
        if OUT_U8:
            v = tl.floor(tl.minimum(tl.maximum(v, 0.0), 255.0) + 0.5)
        tl.store(o_ptr + c64 * n_pix, v.to(out_ptr.dtype.element_ty), mask=live)


def multi_crop_fwd(images: Tensor, boxes: Tensor, flips: Tensor, out_h: int, out_w: int, out_dtype: torch.dtype) -> Tensor:
    """images ``[N, C, H, W]`` (float32/16/bf16/uint8), boxes ``[N, P, 4]``, flips bool ``[N, P]``
    (checked by the caller) -> ``[N*P, C, out_h, out_w]`` in ``out_dtype``."""
    N, C, H, W = images.shape
    P = boxes.shape[1]
    out = torch.empty((N * P, C, out_h, out_w), device=images.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    b = boxes.to(torch.float32).reshape(N * P, 4)
    # the scales divided here, exactly as the reference (a GPU kernel's "/" is approximate)
    b = torch.cat([b, b[:, 2:] / torch.tensor([out_h, out_w], dtype=torch.float32, device=b.device)], 1)
    f = flips.reshape(N * P).contiguous()
    BLOCK = 256
    grid = check_grid((N * P * triton.cdiv(out_h * out_w, BLOCK),), "multi_crop")
    with device_of(images):  # launch on the tensors' GPU, not the current one
        wrap_triton(_multi_crop_kernel)[grid](
            images, b, f, out, P, C, H, W, out_h, out_w, *images.stride(),
            OUT_U8=out_dtype == torch.uint8, BLOCK=BLOCK,
        )
    return out
