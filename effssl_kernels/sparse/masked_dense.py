"""Masked-dense conv and BatchNorm that save what the dense layers save, for backward.

Layers that are not tile-aligned (a block smaller than a pixel of a deep map, say layer4 of a
ResNet at block 16) run masked-dense: the dense layer between masks, as the references in
``reference/masked_net.py``. Built from pointwise ops, those make autograd keep a masked copy of
each conv's input (on top of the input the ReLU before it already saved) and three or four
full-size intermediates per BatchNorm. These Functions compute the same values with the same
ops and save only the layer's input (and the small pixel masks); backward masks again and
runs the conv's backward, or BatchNorm's closed-form backward restricted to the kept positions.
Both backwards are built from differentiable ops on the saved inputs (BatchNorm recomputes its
batch statistics there), so double backward works; vmap works through generated rules. While a
forward-mode dual level is open, and for SyncBatchNorm's cross-rank sums, the references run.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import forward_ad_active
from .._utils import conv_out_len
from ..masks import BlockMask, _pair, _positive_pair
from ..reference.masked_net import (
    _acc_dtype,
    _apply,
    _check_x_mask,
    _mul,
    _no_padding,
    check_batch_norm_args,
    masked_batch_norm_reference,
    masked_conv2d_reference,
    normalize_kept,
    slice_1x1,
    update_running_stats,
)
from .halo_ops import autocast_conv_args, conv_backward


class _MaskedConv2d(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, m_in, m_out, stride, padding, dilation, groups, sliced):
        # m_out None: the same mask as m_in (Dynamo refuses one tensor given twice to a Function)
        m_out = m_in if m_out is None else m_out
        xm = _apply(m_in, x)
        if sliced:  # see masked_conv2d_reference: a CPU bug of strided 1x1 convs, channels-last
            y = F.conv2d(slice_1x1(xm, stride), weight, bias, 1, 0, dilation, groups)
        else:
            y = F.conv2d(xm, weight, bias, stride, padding, dilation, groups)
        return _apply(m_out, y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, m_in, m_out, stride, padding, dilation, groups, sliced = inputs
        ctx.save_for_backward(x, weight, m_in, m_out)  # x, not its masked copy
        ctx.conv = (stride, padding, dilation, groups, sliced, bias is not None)

    @staticmethod
    def backward(ctx, gy):
        x, weight, m_in, m_out = ctx.saved_tensors
        m_out = m_in if m_out is None else m_out
        stride, padding, dilation, groups, sliced, has_bias = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        xm = _apply(m_in, x)  # the masked input again, not kept from forward
        g = _apply(m_out, gy)
        if sliced:
            xin, conv_stride, conv_pad = slice_1x1(xm, stride), [1, 1], [0, 0]
        else:
            xin, conv_stride, conv_pad = xm, list(stride), list(padding)
        gx, gw, gb = conv_backward(g, xin, weight, has_bias, conv_stride, conv_pad, dilation, groups,
                                   [need_x, need_w, need_b])
        if need_x:
            if sliced:
                full = torch.zeros_like(xm)
                full[..., ::stride[0], ::stride[1]] = gx
                gx = full
            gx = _apply(m_in, gx)
        return gx, gw, gb, None, None, None, None, None, None, None


def _int_padding(padding, kernel, dilation):
    """``padding`` as two ints, or None for one this Function leaves to the reference (and to
    F.conv2d's errors): ``"same"`` with an odd reach (F.conv2d pads the input unevenly itself),
    unknown strings, negative values."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            reach = [d * (k - 1) for d, k in zip(dilation, kernel)]
            return None if any(r % 2 for r in reach) else (reach[0] // 2, reach[1] // 2)
        return None
    p = _pair(padding, "padding")
    return p if min(p) >= 0 else None


def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
                  padding=0, dilation=1, groups: int = 1, *, mask: BlockMask,
                  in_stride=1) -> Tensor:
    """:func:`~effssl_kernels.reference.masked_net.masked_conv2d_reference` (same arguments,
    shapes and values: ``M_out * conv2d(M_in * x)``) saving x, not its masked copy."""
    if forward_ad_active():
        return masked_conv2d_reference(x, weight, bias, stride, padding, dilation, groups,
                                       mask=mask, in_stride=in_stride)
    _check_x_mask(x, mask, "masked_conv2d")
    s_in = _positive_pair(in_stride, "in_stride")
    s = _positive_pair(stride, "stride")
    d = _pair(dilation, "dilation")
    pad = _int_padding(padding, tuple(weight.shape[-2:]), d) if weight.dim() == 4 else None
    if pad is None or min(d) <= 0 or (isinstance(padding, str) and s != (1, 1)):
        return masked_conv2d_reference(x, weight, bias, stride, padding, dilation, groups,
                                       mask=mask, in_stride=in_stride)
    x, weight, bias = autocast_conv_args(x.device.type, x, weight, bias)
    sliced = (s != (1, 1) and tuple(weight.shape[-2:]) == (1, 1) and _no_padding(padding)
              and not x.is_contiguous())
    m_in = mask.pixel_mask(s_in, x.shape[-2:])
    ho = conv_out_len(x.shape[-2], 2 * pad[0], weight.shape[-2], d[0], s[0])
    wo = conv_out_len(x.shape[-1], 2 * pad[1], weight.shape[-1], d[1], s[1])
    if ho <= 0 or wo <= 0:  # F.conv2d's error, from the reference
        return masked_conv2d_reference(x, weight, bias, stride, padding, dilation, groups,
                                       mask=mask, in_stride=in_stride)
    m_out = mask.pixel_mask(_mul(s_in, s), (ho, wo))
    if m_out is m_in:  # a cached mask (stride 1, same size): given once, see _MaskedConv2d
        m_out = None
    return _MaskedConv2d.apply(x, weight, bias, m_in, m_out, s, pad, d, groups, sliced)


def _batch_stats(xa: Tensor, m: Tensor):
    """Mean and biased variance over the kept positions (two passes), and their count."""
    C = xa.shape[1]
    n = m.sum(dtype=torch.int64)
    n_safe = n.clamp(min=1).to(xa.dtype)
    mean = xa.sum(dim=(0, 2, 3)) / n_safe
    xc = _apply(m, xa - mean.view(1, C, 1, 1))
    return mean, (xc * xc).sum(dim=(0, 2, 3)) / n_safe, n


class _MaskedBatchNorm(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, m, weight, bias, mean, var, eps):
        # mean / var None: batch statistics (training), returned for the running update
        acc = _acc_dtype(x.dtype)
        xa = _apply(m, x).to(acc)
        if mean is None:
            mean, var, _ = _batch_stats(xa, m)
        else:  # copies: a Function's outputs must not be its inputs (the running buffers)
            mean, var = mean.to(acc, copy=True), var.to(acc, copy=True)
        return normalize_kept(xa, m, mean, var, weight, bias, eps, x.dtype), mean, var

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, m, weight, bias, mean, var, eps = inputs
        _, bmean, bvar = output
        ctx.mark_non_differentiable(bmean, bvar)
        ctx.training = mean is None
        # Training saves only x and recomputes the statistics in backward (so that backward is
        # a function of x and double backward is right); eval saves the fixed statistics.
        ctx.save_for_backward(x, m, weight, *(() if ctx.training else (bmean, bvar)))
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        x, m, weight, *stats = ctx.saved_tensors
        C = x.shape[1]
        acc = _acc_dtype(x.dtype)
        xa = _apply(m, x).to(acc)
        if ctx.training:
            mean, var, n = _batch_stats(xa, m)
        else:
            mean, var = stats
        invstd = torch.rsqrt(var + ctx.eps)
        xhat = _apply(m, (xa - mean.view(1, C, 1, 1)) * invstd.view(1, C, 1, 1))
        g = _apply(m, gy.to(acc))
        sum_g = g.sum(dim=(0, 2, 3))
        sum_gx = (g * xhat).sum(dim=(0, 2, 3))
        gx = None
        if ctx.needs_input_grad[0]:
            scale = invstd if weight is None else invstd * weight.to(acc)
            if ctx.training:
                n_safe = n.clamp(min=1).to(acc)
                g = g - (sum_g / n_safe).view(1, C, 1, 1) - xhat * (sum_gx / n_safe).view(1, C, 1, 1)
            gx = _apply(m, (g * scale.view(1, C, 1, 1)).to(x.dtype))
        gw = sum_gx.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        gb = sum_g.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[3] else None
        return gx, None, gw, gb, None, None, None


def masked_batch_norm(x: Tensor, mask_pixels: Tensor, running_mean: Optional[Tensor],
                      running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                      bias: Optional[Tensor] = None, training: bool = False,
                      momentum: float = 0.1, eps: float = 1e-5, reduce=None) -> Tensor:
    """:func:`~effssl_kernels.reference.masked_net.masked_batch_norm_reference` (same arguments,
    shapes, values and running-statistics update) saving x and the pixel mask only."""
    if reduce is not None or forward_ad_active() or any(
            t is not None and t.requires_grad for t in (running_mean, running_var)):
        return masked_batch_norm_reference(x, mask_pixels, running_mean, running_var, weight,
                                           bias, training, momentum, eps, reduce=reduce)
    check_batch_norm_args(x, mask_pixels, running_mean, running_var, weight, bias, training,
                          momentum, "masked_batch_norm")
    stats = (None, None) if training else (running_mean, running_var)
    y, mean, var = _MaskedBatchNorm.apply(x, mask_pixels, weight, bias, *stats, eps)
    if training and running_mean is not None:
        n = mask_pixels.sum(dtype=torch.int64)
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
    return y
