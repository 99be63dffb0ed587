"""Plain-PyTorch references of the masked (waxing-and-waning) network, SEMANTICS.md section 2.

The oracle of the block-sparse kernels: dense computation, then masks. Removed inputs are read as
exactly zero (``torch.where``, so even inf/NaN under a removed block cannot leak, as in a kernel
that never reads it) and removed outputs are exactly zero; gradients at removed positions are zero.
All functions are differentiable with autograd.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import BlockMask, _pair, _positive_pair

IntOrPair = Union[int, Sequence[int]]


def _check_x_mask(x: Tensor, mask: BlockMask, fn: str) -> None:
    if not isinstance(mask, BlockMask):
        raise TypeError(f"{fn}: mask must be a BlockMask, got {type(mask).__name__}")
    mask.check_input(x, fn)


def _mul(a: Tuple[int, int], b: Tuple[int, int]) -> Tuple[int, int]:
    return a[0] * b[0], a[1] * b[1]


def _apply(m: Tensor, x: Tensor) -> Tensor:
    """``m * x`` with removed positions exactly zero whatever ``x`` holds there."""
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_conv2d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                            stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0,
                            dilation: IntOrPair = 1, groups: int = 1, *, mask: BlockMask,
                            in_stride: IntOrPair = 1) -> Tensor:
    """``M_out * conv2d(M_in * x)``: x ``[N, C, H, W]`` at cumulative stride ``in_stride``,
    weight ``[C_out, C / groups, kh, kw]`` -> ``[N, C_out, ho, wo]`` at stride
    ``in_stride * stride``, with ``M_in = mask.pixel_mask(in_stride, (H, W))`` and
    ``M_out = mask.pixel_mask(in_stride * stride, (ho, wo))``. Arguments as ``F.conv2d``."""
    _check_x_mask(x, mask, "masked_conv2d_reference")
    s_in = _positive_pair(in_stride, "in_stride")
    s = _positive_pair(stride, "stride")
    xm = _apply(mask.pixel_mask(s_in, x.shape[-2:]), x)
    if (s != (1, 1) and tuple(weight.shape[-2:]) == (1, 1) and _no_padding(padding)
            and not xm.is_contiguous()):
        # A CPU bug of torch 2.14 (oneDNN): the backward of a strided 1x1 conv of a
        # channels-last input corrupts the heap (abort) or gives wrong gradients. Slicing,
        # then a stride-1 conv, is the same conv (ceil(H / s) outputs either way). NCHW inputs
        # keep F.conv2d as is: bit-equal to the dense conv when everything is kept.
        y = F.conv2d(slice_1x1(xm, s), weight, bias, 1, 0, dilation, groups)
    else:
        y = F.conv2d(xm, weight, bias, s, padding, dilation, groups)
    return _apply(mask.pixel_mask(_mul(s_in, s), y.shape[-2:]), y)


def slice_1x1(x: Tensor, s: Tuple[int, int]) -> Tensor:
    """Every s-th pixel of x, in x's memory format (what a strided 1x1 conv reads)."""
    xs = x[..., ::s[0], ::s[1]]
    if x.is_contiguous(memory_format=torch.channels_last):
        xs = xs.contiguous(memory_format=torch.channels_last)  # F.conv2d's output layout
    return xs


def _no_padding(padding) -> bool:
    if isinstance(padding, str):
        return padding == "valid"
    if isinstance(padding, (tuple, list)):
        return all(p == 0 for p in padding)
    return padding == 0


def pool_stride(kernel_size, stride):
    """A pool's stride as ``F.max_pool2d`` reads it: None, () and [] mean ``kernel_size``."""
    no_stride = stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)
    return kernel_size if no_stride else stride


def masked_max_pool2d_reference(x: Tensor, kernel_size: IntOrPair, stride: Optional[IntOrPair] = None,
                                padding: IntOrPair = 0, dilation: IntOrPair = 1,
                                ceil_mode: bool = False, *, mask: BlockMask,
                                in_stride: IntOrPair = 1) -> Tensor:
    """``M_out * max_pool2d(M_in * x)`` (arguments as ``F.max_pool2d``; ``stride=None`` means
    ``kernel_size``). Removed inputs take part in the max as zeros; the image padding is -inf as
    in ``F.max_pool2d``. Output stride ``in_stride * stride``."""
    _check_x_mask(x, mask, "masked_max_pool2d_reference")
    s_in = _positive_pair(in_stride, "in_stride")
    s = _positive_pair(pool_stride(kernel_size, stride), "stride")
    y = _max_pool2d_padded(_apply(mask.pixel_mask(s_in, x.shape[-2:]), x), kernel_size, s, padding,
                           dilation, ceil_mode)
    return _apply(mask.pixel_mask(_mul(s_in, s), y.shape[-2:]), y)


def _max_pool2d_padded(x: Tensor, kernel_size: IntOrPair, stride: Tuple[int, int], padding: IntOrPair,
                       dilation: IntOrPair, ceil_mode: bool) -> Tensor:
    """``F.max_pool2d`` with its -inf padding made explicit: where a window lies wholly in the
    padding, torch (2.14, CPU) returns an index outside the input and its backward writes out of
    bounds (wrong gradients, heap corruption); padded first, every index is in range. The output
    size is ``F.max_pool2d``'s (ceil_mode's last window must start inside the input or the left
    padding, which pooling the padded input would not know). Values equal F.max_pool2d's; the
    gradient too, except where a window's inputs are all -inf: torch gives it to one of them,
    here the padding takes it (both subgradients; removed pixels are zeros, never -inf)."""
    k, p, d = (_positive_pair(kernel_size, "kernel_size"), _pair(padding, "padding"),
               _positive_pair(dilation, "dilation"))
    if p == (0, 0) or any(q < 0 or 2 * q > kk for q, kk in zip(p, k)):  # bad: torch's own error
        return F.max_pool2d(x, k, stride, p, d, ceil_mode)
    out = [_pool_out(x.shape[2 + i], k[i], stride[i], p[i], d[i], ceil_mode) for i in range(2)]
    low = float("-inf") if x.is_floating_point() else torch.iinfo(x.dtype).min  # torch's own padding
    xp = F.pad(x, (p[1], p[1], p[0], p[0]), value=low)
    return F.max_pool2d(xp, k, stride, 0, d, ceil_mode)[..., :out[0], :out[1]]


def _pool_out(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling output size (aten/src/ATen/native/Pool.h, pooling_output_shape)."""
    span = n + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def _check_pixels(x: Tensor, mask_pixels: Tensor, fn: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{fn}: x must be a 4-D [N, C, H, W] tensor")
    if not isinstance(mask_pixels, Tensor) or mask_pixels.dtype != torch.bool:
        raise TypeError(f"{fn}: mask_pixels must be a bool tensor [N, 1, H, W] (BlockMask.pixel_mask)")
    N, _, H, W = x.shape
    if tuple(mask_pixels.shape) != (N, 1, H, W):
        raise ValueError(f"{fn}: mask_pixels shape {tuple(mask_pixels.shape)} does not match x: "
                         f"expected {(N, 1, H, W)}")
    if mask_pixels.device != x.device:
        raise ValueError(f"{fn}: mask_pixels is on {mask_pixels.device} but x is on {x.device}")


def _acc_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


def masked_batch_norm_reference(x: Tensor, mask_pixels: Tensor, running_mean: Optional[Tensor],
                                running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                                bias: Optional[Tensor] = None, training: bool = False,
                                momentum: float = 0.1, eps: float = 1e-5,
                                reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """BatchNorm2d over the kept positions: x ``[N, C, H, W]``, mask_pixels bool ``[N, 1, H, W]``
    -> ``M * bn(x)``, same shape and dtype (statistics in float32 for fp16/bf16 inputs).

    Training: per channel, mean and biased variance over the ``n`` kept positions of the batch
    normalise; ``running_mean``/``running_var`` (when given) are updated in place with that mean and
    the unbiased variance ``var * n / (n - 1)``, weighted by ``momentum``; no update when
    ``n <= 1``. ``n == 0`` gives an all-zero output, never NaN. Eval: running statistics.

    ``momentum`` is the update factor, a float, as for ``F.batch_norm``; ``None`` is rejected:
    ``nn.BatchNorm2d(momentum=None)`` (cumulative average) passes ``1 / num_batches_tracked``.

    ``reduce`` (training only): a differentiable sum of a tensor across ranks (SyncBatchNorm);
    the per-channel sums, the count and the squared deviations pass through it, so ``n``, the
    mean and the variance are over the kept positions of all ranks (two passes: no
    ``E[x^2] - mean^2`` cancellation).
    """
    fn = "masked_batch_norm_reference"
    check_batch_norm_args(x, mask_pixels, running_mean, running_var, weight, bias, training,
                          momentum, fn)
    C = x.shape[1]
    acc = _acc_dtype(x.dtype)
    xa = _apply(mask_pixels, x).to(acc)
    m = mask_pixels.to(acc)
    if training:
        n = mask_pixels.sum(dtype=torch.int64)  # kept positions per channel (no host sync)
        s1 = xa.sum(dim=(0, 2, 3))
        if reduce is not None:
            both = reduce(torch.cat([s1, n.to(acc).view(1)]))
            s1, n = both[:C], both[C].detach().round().to(torch.int64)
        n_safe = n.clamp(min=1).to(acc)
        mean = s1 / n_safe
        sq = (m * (xa - mean.view(1, C, 1, 1)) ** 2).sum(dim=(0, 2, 3))
        var = (sq if reduce is None else reduce(sq)) / n_safe
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, n, momentum)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    return normalize_kept(xa, mask_pixels, mean, var, weight, bias, eps, x.dtype)


def normalize_kept(xa: Tensor, mask_pixels: Tensor, mean: Tensor, var: Tensor,
                   weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   dtype: torch.dtype) -> Tensor:
    """``M * (weight * (xa - mean) / sqrt(var + eps) + bias)`` in ``dtype``: BatchNorm's output
    from its statistics, xa ``[N, C, H, W]`` in the accumulation dtype, the rest ``[C]``."""
    C, acc = xa.shape[1], xa.dtype
    y = (xa - mean.view(1, C, 1, 1)) * torch.rsqrt(var.view(1, C, 1, 1) + eps)
    if weight is not None:
        y = y * weight.to(acc).view(1, C, 1, 1)
    if bias is not None:
        y = y + bias.to(acc).view(1, C, 1, 1)
    return _apply(mask_pixels, y.to(dtype))


def check_batch_norm_args(x: Tensor, mask_pixels: Tensor, running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], weight: Optional[Tensor],
                          bias: Optional[Tensor], training: bool, momentum: float, fn: str) -> None:
    """The argument rules of :func:`masked_batch_norm_reference` (the sparse layers' too)."""
    _check_pixels(x, mask_pixels, fn)
    if momentum is None:
        raise ValueError(f"{fn}: momentum=None is not supported: pass the update factor, as "
                         f"nn.BatchNorm2d does for a cumulative average (1 / num_batches_tracked)")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{fn}: give both running_mean and running_var or neither")
    if not training and running_mean is None:
        raise ValueError(f"{fn}: eval mode needs running_mean and running_var")
    C = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"{fn}: {name} must have shape [{C}], got {tuple(t.shape)}")


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         n: Tensor, momentum: float) -> None:
    """In place, as BatchNorm2d: ``running = (1 - momentum) * running + momentum * stat``, the
    biased ``var`` made unbiased (``* n / (n - 1)``); no update where ``n <= 1`` (no host sync).

    Their version counters are kept, as F.batch_norm updates them inside its kernel: an
    F.batch_norm of the same module earlier in the step (the packed path: another view, or
    another image size under one keep) saved them for its backward, which failed ("modified by
    an inplace operation") until 2026-12-06. In training that backward never reads them."""
    with torch.no_grad():
        upd = n > 1
        unbiased = var * n.to(var.dtype) / (n - 1).clamp(min=1).to(var.dtype)
        new_mean = (1 - momentum) * running_mean + momentum * mean.to(running_mean.dtype)
        new_var = (1 - momentum) * running_var + momentum * unbiased.to(running_var.dtype)
        # not `.data`, which torch.func.vmap refuses (batched running stats of an ensemble)
        with torch.autograd._unsafe_preserve_version_counter(running_mean):
            running_mean.copy_(torch.where(upd, new_mean, running_mean))
        with torch.autograd._unsafe_preserve_version_counter(running_var):
            running_var.copy_(torch.where(upd, new_var, running_var))


def masked_avg_pool_reference(x: Tensor, mask_pixels: Tensor) -> Tensor:
    """Global average pooling over the kept positions of each sample: x ``[N, C, H, W]``,
    mask_pixels bool ``[N, 1, H, W]`` -> ``[N, C]`` in x's dtype (float32 sums for fp16/bf16);
    a sample with nothing kept gives zeros, never NaN."""
    _check_pixels(x, mask_pixels, "masked_avg_pool_reference")
    acc = _acc_dtype(x.dtype)
    s = _apply(mask_pixels, x).to(acc).sum(dim=(2, 3))
    n = mask_pixels.sum(dim=(1, 2, 3), dtype=torch.int64).clamp(min=1).to(acc)
    return (s / n.view(-1, 1)).to(x.dtype)
