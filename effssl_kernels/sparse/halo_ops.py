"""Conv and max pool over halo'd tiles that save the tiles, not their halo'd copy, for backward.

``F.conv2d(halo_gather(tiles))`` would make autograd keep the halo'd ``[T, C, bh + 2h, bw + 2h]``
input of every tiled conv: a second copy of the map (the tiles themselves are already saved by
the ReLU before it, as in the dense network, where a conv's saved input is that ReLU's output),
2.25x the tiles at 4 x 4 tiles, 9x at 1 x 1. Training memory would then exceed the dense model's
at keep 1.0 and barely shrink with keep. These Functions save the tiles and the cached tables
and gather the halo again in backward (a copy, cheap next to the conv); the gradient of the
halo'd input goes back to the tiles through the halo gather's adjoint. Their backwards are
built from differentiable ops, so double backward works; vmap works through generated rules,
forward-mode AD through subclasses with a jvp (used only inside a dual level, since Dynamo
cannot trace a Function that defines one). Under autocast the inputs are cast as F.conv2d's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import forward_ad_active
from ..masks import _pair
from ..ops.halo_gather import halo_gather_backward_op, halo_gather_op
from .tiles import TileIndex, _check_tiles, _halo4

_aten = torch.ops.aten


def autocast_conv_args(device_type: str, *tensors):
    """``tensors`` as ``F.conv2d`` sees them under autocast: float32/16/bf16 cast to the autocast
    dtype, float64 and None left alone (autocast's own rule for conv)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dt = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def conv_backward(gy, x, weight, has_bias, stride, padding, dilation, groups, need):
    """``aten.convolution_backward`` -> (gx, gw, gb), each None where ``need`` says so. On CPU,
    fp16 and bf16 run in float32 (each result cast back to its input's dtype): oneDNN's bf16
    weight gradient of a channels-last 1x1 input reads garbage in most runs, and its fp16 one
    sums thousands of tiles in fp16 (torch 2.14, audit 88). CUDA (cuDNN) accumulates in float32."""
    bias_sizes = [weight.shape[0]] if has_bias else None
    need = [need[0], need[1], need[2] and has_bias]
    args = (bias_sizes, list(stride), list(padding), list(dilation), False, [0, 0], groups, need)
    low = (torch.float16, torch.bfloat16)
    if x.device.type != "cpu" or (x.dtype not in low and weight.dtype not in low):
        return _aten.convolution_backward(gy, x, weight, *args)
    gx, gw, gb = _aten.convolution_backward(gy.float(), x.float(), weight.float(), *args)
    return (None if gx is None else gx.to(x.dtype), None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(weight.dtype))


class _HaloConv2d(torch.autograd.Function):
    # forward / setup_context split (not forward(ctx, ...)): the style torch.func's transforms
    # need; vmap (e.g. over a batch of weights) runs forward, backward and jvp per sample
    generate_vmap_rule = True

    @staticmethod
    def forward(tiles, weight, bias, table, order, offsets, stride, dilation, groups):
        x = halo_gather_op(tiles, table, order, offsets, 0.0)
        return F.conv2d(x, weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        tiles, weight, bias, table, order, offsets, stride, dilation, groups = inputs
        ctx.save_for_backward(tiles, weight, table, order, offsets)
        ctx.conv = (stride, dilation, groups, bias is not None)

    @staticmethod
    def backward(ctx, gy):
        tiles, weight, table, order, offsets = ctx.saved_tensors
        stride, dilation, groups, has_bias = ctx.conv
        need_t, need_w, need_b = ctx.needs_input_grad[:3]
        x = halo_gather_op(tiles, table, order, offsets, 0.0)  # the halo again, not kept from forward
        gx, gw, gb = conv_backward(gy, x, weight, has_bias, stride, [0, 0], dilation, groups,
                                   [need_t, need_w, need_b])
        gt = None
        if need_t:
            gt = halo_gather_backward_op(gx, order, offsets, tiles.shape[0], tiles.shape[2], tiles.shape[3])
        return gt, gw, gb, None, None, None, None, None, None


class _HaloMaxPool2d(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(tiles, table, order, offsets, kernel_size, stride, dilation):
        x = halo_gather_op(tiles, table, order, offsets, float("-inf"))
        return F.max_pool2d(x, kernel_size, stride, 0, dilation, return_indices=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        tiles, table, order, offsets, kernel_size, stride, dilation = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(tiles, table, order, offsets, output[1])  # the indices, as the dense pool
        ctx.pool = (kernel_size, stride, dilation)

    @staticmethod
    def backward(ctx, gy, _gidx):
        tiles, table, order, offsets, idx = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        kernel_size, stride, dilation = ctx.pool
        x = halo_gather_op(tiles, table, order, offsets, float("-inf"))
        gx = _aten.max_pool2d_with_indices_backward(gy, x, list(kernel_size), list(stride), [0, 0],
                                                   list(dilation), False, idx)
        gt = halo_gather_backward_op(gx, order, offsets, tiles.shape[0], tiles.shape[2], tiles.shape[3])
        return gt, None, None, None, None, None, None


# Dynamo cannot trace a Function that defines jvp (a graph break, an error under fullgraph), so
# the jvp lives in subclasses used only while a forward-mode dual level is open.
class _HaloConv2dJvp(_HaloConv2d):
    @staticmethod
    def setup_context(ctx, inputs, output):
        _HaloConv2d.setup_context(ctx, inputs, output)
        tiles, weight, _, table, order, offsets = inputs[:6]
        ctx.save_for_forward(tiles, weight, table, order, offsets)

    @staticmethod
    def jvp(ctx, dt, dw, db, *_):
        # forward mode: conv(halo(dt), w) + conv(halo(t), dw) + db (bilinear in tiles and weight)
        tiles, weight, table, order, offsets = ctx.saved_tensors
        stride, dilation, groups, _ = ctx.conv
        out = None
        if dt is not None:
            out = F.conv2d(halo_gather_op(dt, table, order, offsets, 0.0), weight, None, stride, 0, dilation, groups)
        if dw is not None:
            y = F.conv2d(halo_gather_op(tiles, table, order, offsets, 0.0), dw, None, stride, 0, dilation, groups)
            out = y if out is None else out + y
        if db is not None:
            out = db.view(1, -1, 1, 1) if out is None else out + db.view(1, -1, 1, 1)
        return out


class _HaloMaxPool2dJvp(_HaloMaxPool2d):
    @staticmethod
    def setup_context(ctx, inputs, output):
        _HaloMaxPool2d.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[1:4], output[1])

    @staticmethod
    def jvp(ctx, dt, *_):
        # forward mode: the halo'd tangent at each window's argmax (the index is flat in the plane)
        table, order, offsets, idx = ctx.saved_tensors
        dx = halo_gather_op(dt, table, order, offsets, 0.0)
        return dx.flatten(2).gather(2, idx.flatten(2)).view(idx.shape), None


def halo_conv2d(tiles: Tensor, weight: Tensor, bias: Optional[Tensor], index: TileIndex, halo,
                stride, dilation, groups: int) -> Tensor:
    """``F.conv2d(halo_gather(tiles, index, halo), weight, bias, stride, 0, dilation, groups)``
    (tiles ``[T, C, bh, bw]`` -> ``[T, C_out, oh, ow]``), saving ``tiles`` instead of the halo'd
    copy for backward. A zero halo is a plain conv of the tiles (nothing to regather)."""
    _check_tiles(tiles, index, "halo_conv2d")
    key = _halo4(halo)
    if key == (0, 0, 0, 0):
        return F.conv2d(tiles, weight, bias, stride, 0, dilation, groups)
    tiles, weight, bias = autocast_conv_args(tiles.device.type, tiles, weight, bias)
    order, offsets = index.halo_inverse(key)
    cls = _HaloConv2dJvp if forward_ad_active() else _HaloConv2d
    return cls.apply(tiles, weight, bias, index.halo_table(key), order, offsets,
                     _pair(stride, "stride"), _pair(dilation, "dilation"), groups)


def halo_max_pool2d(tiles: Tensor, index: TileIndex, halo, kernel_size, stride, dilation) -> Tensor:
    """``F.max_pool2d(halo_gather(tiles, index, halo, outside=-inf), kernel_size, stride, 0,
    dilation)``, saving ``tiles`` and the argmax indices (as the dense pool) for backward."""
    _check_tiles(tiles, index, "halo_max_pool2d")
    key = _halo4(halo)
    if key == (0, 0, 0, 0):
        return F.max_pool2d(tiles, kernel_size, stride, 0, dilation)
    order, offsets = index.halo_inverse(key)
    cls = _HaloMaxPool2dJvp if forward_ad_active() else _HaloMaxPool2d
    return cls.apply(tiles, index.halo_table(key), order, offsets, _pair(kernel_size, "kernel_size"),
                     _pair(stride, "stride"), _pair(dilation, "dilation"))[0]
