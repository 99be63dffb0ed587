"""Plain-PyTorch reference of multi_crop (SEMANTICS.md section 4): crop, bilinear resize
(``align_corners=False``, no antialias), horizontal flip, for many boxes per image.

The arithmetic is torch's ``upsample_bilinear2d`` applied to the crop, so integer boxes give
``torchvision.transforms.v2.functional.resized_crop(..., antialias=False)`` (+ ``hflip``) up to
float rounding. For one axis of a box ``(start, size)`` resized to ``out``:

    s   = clamp((o + 1/2) * size / out - 1/2, 0, max(size - 1, 0))   # torch's source index
    u   = s + frac(start);  i0 = floor(start) + floor(u);  lam = u - floor(u)
    out = (1 - lam) * img[i0] + lam * img[i0 + 1]                     # img = 0 outside

(the upper clamp is torch's ``i1 = min(i0 + 1, size - 1)``; fractional starts generalise the
crop). The 2-D value is ``wy0 * (wx0 v00 + wx1 v01) + wy1 * (wx0 v10 + wx1 v11)``, torch's
order. A tap with weight 0 is not read, so a NaN there does not leak.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def axis_taps(start: Tensor, size: Tensor, out: int, limit: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source taps of ``out`` output positions along one axis for boxes ``(start, size)``
    (float ``[...]``): int64 ``i0``, ``i1`` (``-1`` where the tap is outside ``[0, limit)`` or has
    weight 0) and the weights ``w0``, ``w1``, each ``[..., out]`` in ``start``'s dtype."""
    o = torch.arange(out, device=start.device, dtype=start.dtype)
    scale = (size / out)[..., None]
    s = (scale * (o + 0.5) - 0.5).clamp_min(0)
    s = torch.minimum(s, (size - 1).clamp_min(0)[..., None])
    fs = torch.floor(start)[..., None]
    u = s + (start[..., None] - fs)
    k = torch.floor(u)
    w1 = u - k
    w0 = 1 - w1
    i0 = (fs + k).to(torch.int64)
    i1 = i0 + 1
    i0 = torch.where((i0 >= 0) & (i0 < limit), i0, -1)
    i1 = torch.where((i1 >= 0) & (i1 < limit) & (w1 != 0), i1, -1)
    return i0, i1, w0, w1


def multi_crop_reference(
    images: Tensor,
    boxes: Tensor,
    flips: Tensor,
    out_size: tuple[int, int],
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """images ``[N, C, H, W]``, boxes ``[N, P, 4]`` (top, left, height, width), flips bool
    ``[N, P]`` -> ``[N*P, C, oh, ow]`` in ``out_dtype`` (default images' dtype; uint8 rounds half
    up and saturates). Computed in float64 for float64 images, else float32."""
    N, C, H, W = images.shape
    P = boxes.shape[1]
    oh, ow = out_size
    cdt = torch.float64 if images.dtype == torch.float64 else torch.float32
    t, l, h, w = boxes.to(cdt).unbind(-1)  # each [N, P]
    y0, y1, wy0, wy1 = axis_taps(t, h, oh, H)  # [N, P, oh]
    x0, x1, wx0, wx1 = axis_taps(l, w, ow, W)  # [N, P, ow]
    # Mirror: output column q reads the taps of column ow - 1 - q.
    f = flips.to(torch.bool)[..., None]
    x0, x1, wx0, wx1 = (torch.where(f, v.flip(-1), v) for v in (x0, x1, wx0, wx1))

    img = images.to(cdt)
    n = torch.arange(N, device=images.device).view(N, 1, 1, 1)

    def at(yi: Tensor, xi: Tensor) -> Tensor:  # -> [N, P, C, oh, ow], 0 where a tap is -1
        valid = (yi[..., :, None] >= 0) & (xi[..., None, :] >= 0)  # [N, P, oh, ow]
        v = img[n, :, yi.clamp_min(0)[..., :, None], xi.clamp_min(0)[..., None, :]]  # [N, P, oh, ow, C]
        v = torch.where(valid[..., None], v, 0)
        return v.permute(0, 1, 4, 2, 3)

    wy0, wy1 = wy0[:, :, None, :, None], wy1[:, :, None, :, None]
    wx0, wx1 = wx0[:, :, None, None, :], wx1[:, :, None, None, :]
    top = wx0 * at(y0, x0) + wx1 * at(y0, x1)
    bottom = wx0 * at(y1, x0) + wx1 * at(y1, x1)
    out = (wy0 * top + wy1 * bottom).reshape(N * P, C, oh, ow)
    dt = out_dtype or images.dtype
    if dt == torch.uint8:
        out = (out.clamp(0, 255) + 0.5).floor()
    return out.to(dt)
