"""Plain-PyTorch reference of the photometric chain (issue 7): the oracle of the fused kernel.

Batched over N with per-sample parameters (no Python loop over samples): each op runs once on
the subset of samples whose flag is set. It follows ``torchvision.transforms.v2.functional``
(torchvision 0.2x, ``_color.py`` / ``_misc.py``) op by op:

* brightness: ``x * b`` clamped to [0, max].
* contrast: blend ``x * c + m * (1 - c)`` clamped, ``m`` the mean over (C, H, W) of the
  grayscale image (``0.2989 r + 0.587 g + 0.114 b``).
* saturation: blend with the per-pixel grayscale image.
* hue: float32 rgb -> hsv (``_rgb_to_hsv``), ``h = (h + shift) mod 1``, hsv -> rgb
  (``_hsv_to_rgb``). A shift of exactly 0 is skipped (ColorJitter skips hue=0).
* grayscale: ``0.2989 r + 0.587 g + 0.114 b`` broadcast to 3 channels.
* gaussian blur: torchvision's ``_get_gaussian_kernel1d`` (``softmax(-(x / sigma)^2)`` over
  ``x = linspace(-lim, lim, k)``, ``lim = (k - 1) / (2 sqrt 2)``), reflect padding of ``k // 2``;
  torchvision convolves with the outer-product 2-D kernel, this reference separably (same
  maths, float rounding differs by ~1e-7).
* solarize: ``where(x >= t, max - x, x)``.
* normalise: ``(x - mean) / std``.

uint8 views (as torchvision does for uint8): brightness/contrast/saturation compute in float32
(the grayscale used by contrast and saturation is floored first), clamp to [0, 255] and convert
back with ``.to(uint8)``, i.e. TRUNCATION, after every op; hue converts to float32 ``x / 255``
and back with ``(y * 255.999).to(uint8)`` (truncation); grayscale truncates; blur convolves in
float32 and ROUNDS; solarize is ``255 - x`` where ``x >= threshold * 255``. Every intermediate is
uint8 again, exactly as the chain of torchvision calls. With normalisation the uint8 result is
converted to float32 as ``to_dtype(scale=True)`` (``x * (1/255)``) and normalised: float32 out.

float16 / bfloat16 views are computed in float32 and rounded once at the end (torchvision
computes each op in the half type and rounds after each); the result is the float32 chain on
the same input rounded to the half type.

Solarize thresholds are in [0, 1] units (uint8 compares against ``threshold * 255``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from ..photometric import PhotometricParams

__all__ = ["photometric_reference", "gaussian_kernel1d", "photometric_mismatch"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)


def _col(v: Tensor) -> Tensor:
    """[n] -> [n, 1, 1, 1] float32."""
    return v.to(torch.float32).view(-1, 1, 1, 1)


def _alpha(r: Tensor) -> Tensor:
    """``1 - r`` computed in float64 then rounded, as ``add_(..., alpha=1.0 - ratio)`` does."""
    return (1.0 - r.to(torch.float64)).to(torch.float32).view(-1, 1, 1, 1)


def _gray(x: Tensor) -> Tensor:
    """[n, 3, H, W] -> float [n, 1, H, W] (uint8 -> float32), same op order as torchvision."""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _finish(out: Tensor, integer: bool) -> Tensor:
    """clamp, and back to uint8 by truncation for integer images."""
    if integer:
        return out.clamp_(0, 255).to(torch.uint8)
    return out.clamp_(0, 1)


def _brightness(x: Tensor, b: Tensor) -> Tensor:
    return _finish(x.mul(_col(b)), x.dtype == torch.uint8)


def _blend(x: Tensor, other: Tensor, r: Tensor) -> Tensor:
    # torchvision: ``x.mul(r).add_(other, alpha=1 - r)``; the CPU add-with-alpha kernel is fused
    # (one rounding of ``a + alpha * other``), which a per-sample alpha tensor cannot express:
    # emulate it in float64 (the product of two float32 is exact there), then round to float32.
    # It matters for uint8, where the result is truncated (105 * r + 105 * (1 - r) -> 104.99999).
    a = x.mul(_col(r))
    out = a.to(torch.float64).add_(other.to(torch.float64) * _alpha(r).to(torch.float64)).to(torch.float32)
    return _finish(out, x.dtype == torch.uint8)


def _contrast(x: Tensor, c: Tensor) -> Tensor:
    gray = _gray(x)
    if x.dtype == torch.uint8:
        gray = gray.floor_()
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, c)


def _saturation(x: Tensor, s: Tensor) -> Tensor:
    gray = _gray(x)
    if x.dtype == torch.uint8:
        gray = gray.floor_()
    return _blend(x, gray, s)


def _rgb_to_hsv(image: Tensor) -> Tensor:
    # verbatim torchvision.transforms.v2.functional._color._rgb_to_hsv (elementwise, so batched as is)
    r, g, _ = image.unbind(dim=-3)
    minc, maxc = torch.aminmax(image, dim=-3)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    channels_range_divisor = torch.where(eqc, ones, channels_range).unsqueeze_(dim=-3)
    rc, gc, bc = ((maxc.unsqueeze(dim=-3) - image) / channels_range_divisor).unbind(dim=-3)
    mask_maxc_neq_r = maxc != r
    mask_maxc_eq_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(mask_maxc_eq_g & mask_maxc_neq_r)
    hr = bc.sub_(gc).mul_(~mask_maxc_neq_r)
    hb = gc.add_(4.0).sub_(rc).mul_(mask_maxc_neq_r.logical_and_(mask_maxc_eq_g.logical_not_()))
    h = hr.add_(hg).add_(hb)
    h = h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


_HSV_SELECT = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=torch.long)


def _hsv_to_rgb(img: Tensor) -> Tensor:
    # verbatim torchvision.transforms.v2.functional._color._hsv_to_rgb for [n, 3, H, W]
    h, s, v = img.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(dtype=torch.int32)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    i.remainder_(6)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = _HSV_SELECT.to(img.device)[:, i].moveaxis(0, -3)
    return vpqt.gather(-3, select)


def _hue(x: Tensor, shift: Tensor) -> Tensor:
    integer = x.dtype == torch.uint8
    img = x.to(torch.float32).mul_(1.0 / 255) if integer else x.to(torch.float32)
    hsv = _rgb_to_hsv(img)
    h, s, v = hsv.unbind(dim=-3)
    h = h.add(shift.to(torch.float32).view(-1, 1, 1)).remainder_(1.0)
    out = _hsv_to_rgb(torch.stack((h, s, v), dim=-3))
    if integer:
        return out.mul(255 + 1.0 - 1e-3).to(torch.uint8)
    return out


def _grayscale(x: Tensor) -> Tensor:
    return _gray(x).to(x.dtype).expand(x.shape).contiguous()


def gaussian_kernel1d(kernel_size: int, sigma: Tensor) -> Tensor:
    """``[n]`` sigmas -> ``[n, kernel_size]`` float32 kernels, as torchvision's ``_get_gaussian_kernel1d``."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32, device=sigma.device)
    return torch.softmax(x.div(sigma.to(torch.float32).view(-1, 1)).pow(2).neg(), dim=-1)


def blur_fits(kernel_size: int, height: int, width: int) -> bool:
    """Whether a ``kernel_size`` blur can run on ``height x width`` views: reflect padding of
    ``k // 2`` needs ``k // 2 < min(height, width)`` (``F.pad`` and torchvision refuse more)."""
    return kernel_size // 2 < min(height, width)


def blur_size_message(kernel_size: int, height: int, width: int) -> str:
    return (f"photometric: blur_kernel {kernel_size} needs views larger than {kernel_size // 2} px for "
            f"reflect padding, got {height}x{width}")


def _blur(x: Tensor, sigma: Tensor, k: int) -> Tensor:
    integer = x.dtype == torch.uint8
    n, C, H, W = x.shape
    pad = k // 2
    img = x.to(torch.float32)
    kern = gaussian_kernel1d(k, sigma).repeat_interleave(C, dim=0)  # [n*C, k]
    img = img.reshape(1, n * C, H, W)
    img = F.pad(img, [pad, pad, 0, 0], mode="reflect")
    img = F.conv2d(img, kern.view(n * C, 1, 1, k), groups=n * C)
    img = F.pad(img, [0, 0, pad, pad], mode="reflect")
    img = F.conv2d(img, kern.view(n * C, 1, k, 1), groups=n * C)
    out = img.reshape(n, C, H, W)
    if integer:
        return out.round_().to(torch.uint8)
    return out


def _solarize(x: Tensor, thr: Tensor) -> Tensor:
    integer = x.dtype == torch.uint8
    t = _col(thr) * 255 if integer else _col(thr)
    inv = x.bitwise_not() if integer else 1.0 - x
    return torch.where(x >= t, inv, x)


def _apply(x: Tensor, mask: Tensor, fn, *args) -> Tensor:
    """``fn`` on the samples where ``mask`` is set (per-sample ``args`` indexed alike)."""
    idx = mask.nonzero().flatten()
    if idx.numel() == 0:
        return x
    out = x.clone()
    out[idx] = fn(x[idx], *[a[idx] if isinstance(a, Tensor) else a for a in args]).to(x.dtype)
    return out


def photometric_reference(views: Tensor, params: "PhotometricParams") -> Tensor:
    """The photometric chain with per-sample ``params`` on ``views`` ``[N, 3, H, W]``.

    float32/float16/bfloat16 views in [0, 1] or uint8 views; any memory format (a channels_last
    input gives a channels_last output). Returns the input's dtype, or float32 for uint8 views
    when ``params.mean``/``params.std`` are set.
    """
    if not isinstance(views, Tensor):
        raise TypeError(f"photometric: views must be a torch.Tensor, got {type(views).__name__}")
    if views.dim() != 4 or views.shape[1] != 3:
        raise ValueError(f"photometric: views must be [N, 3, H, W], got {list(views.shape)}")
    if views.dtype not in _DTYPES:
        raise TypeError(f"photometric: views must be float32, float16, bfloat16 or uint8, got {views.dtype}")
    N, _, H, W = views.shape
    params.check(N, views.device)
    k = params.blur_kernel
    blur = params.blurs()
    if bool(blur.any()) and not blur_fits(k, H, W):
        raise ValueError(blur_size_message(k, H, W))
    channels_last = views.dim() == 4 and views.is_contiguous(memory_format=torch.channels_last) and not (
        views.is_contiguous()
    )
    in_dtype = views.dtype
    x = views.contiguous()
    if in_dtype in (torch.float16, torch.bfloat16):
        x = x.to(torch.float32)

    jitter = params.jitter_apply
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    ops = (_brightness, _contrast, _saturation, _hue)
    for slot in range(4):
        op_id = params.order[:, slot]
        for t in range(4):
            mask = jitter & (op_id == t)
            if t == 3:
                mask = mask & (params.hue != 0)
            x = _apply(x, mask, ops[t], factors[t])
    x = _apply(x, params.gray, _grayscale)
    x = _apply(x, blur, _blur, params.blur_sigma, k)
    thr = params.solarize_threshold
    if not isinstance(thr, Tensor):
        thr = torch.full((N,), float(thr), dtype=torch.float32, device=views.device)
    x = _apply(x, params.solarize, _solarize, thr)

    if params.mean is not None:
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).mul_(1.0 / 255)
        mean = params.mean.to(x.dtype).view(1, 3, 1, 1)
        std = params.std.to(x.dtype).view(1, 3, 1, 1)
        x = x.sub(mean).div_(std)
        out_dtype = torch.float32 if in_dtype == torch.uint8 else in_dtype
    else:
        out_dtype = in_dtype
    x = x.to(out_dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.clone() if x is views else x  # a new tensor, as the kernels return, even with no op


def photometric_mismatch(got: Tensor, want: Tensor, views_dtype: torch.dtype,
                         level_frac: float = 0.005, std=None) -> tuple:
    """How far a kernel's output ``got`` is from the reference ``want`` (same shape and dtype),
    and whether that is within the kernels' tolerance: ``(max_err, frac_off, why)``, ``why``
    empty when it is.

    float32 views: 2e-5 absolute. float16 / bfloat16 views: one step of the type (the kernels
    compute in float32 and round once, as the reference; the interpreter truncates to
    bfloat16) plus 2e-5. uint8 views: at most one level (1 on uint8 output, 1/255/min(``std``)
    after normalisation; without ``std``, 1/255/0.224, ImageNet's smallest std: pass the
    ``std`` the views were normalised with for others, e.g. CIFAR's 0.1994) on at most
    ``level_frac`` of the values, because torchvision truncates every
    uint8 intermediate, so a float32 rounding difference can move a value one level.
    ``frac_off`` is the fraction off by more than 2e-5. NaN must be where the reference has it.
    The tests and the benchmark both judge by this rule."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return float("inf"), 1.0, f"{got.dtype} {tuple(got.shape)} vs {want.dtype} {tuple(want.shape)}"
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.equal(g.isnan(), w.isnan()):
        return float("inf"), 1.0, "NaN where the reference has none, or the reverse"
    d = (g.nan_to_num() - w.nan_to_num()).abs()
    max_err = float(d.max()) if d.numel() else 0.0
    frac_off = float((d > 2e-5).double().mean()) if d.numel() else 0.0
    if views_dtype == torch.uint8:
        smallest = 0.224 if std is None else float(torch.as_tensor(std, dtype=torch.float64).abs().min())
        level = 1.0 if got.dtype == torch.uint8 else 1 / 255 / smallest
        if max_err > level * 1.01 + 2e-5:
            return max_err, frac_off, f"off by {max_err:.3g} > one level ({level:.3g})"
        if frac_off > level_frac:
            return max_err, frac_off, f"{100 * frac_off:.2f}% of values off > {100 * level_frac:.2f}%"
        return max_err, frac_off, ""
    rtol = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}[views_dtype]
    bad = d > 2e-5 + rtol * w.nan_to_num().abs()
    if bool(bad.any()):
        return max_err, frac_off, f"{int(bad.sum())} values off by more than {rtol:g} x |ref| + 2e-5"
    return max_err, frac_off, ""
