"""tile_conv: a stride-1 convolution over packed tiles, halo read through a table (implicit GEMM).

``tile_conv(tiles, weight, bias, table, table_t)`` equals ``F.conv2d(halo_gather(tiles, table),
weight, bias)`` (VALID, stride 1) without materialising the halo'd tiles. It is the alternative to
cuDNN on halo'd tiles that issue 3 asks to measure; ``sparse`` uses it for stride-1 k > 1 convs
when ``EFFSSL_TILE_CONV=implicit`` (default ``cudnn`` until a GPU has timed both:
bench/bench_sparse_conv.py has both providers).

Op: ``effssl_kernels::_tile_conv_triton`` (Triton: CUDA tensors; CPU only under
TRITON_INTERPRET=1) with autograd: the input gradient is the same op on the output gradient with
the kernel flipped and transposed and the mirrored table ``table_t`` (halo before <-> after), the
weight gradient ``effssl_kernels::_tile_conv_wgrad_triton`` (deterministic split-row partials),
the bias gradient a sum. Both skip removed blocks exactly as the forward does: only kept tiles
exist. The weight-gradient op is bilinear in (grad, tiles) and has autograd too (double backward:
gradient penalties), through the same two ops. The output tiles are the source tiles (stride 1:
``table`` is ``[T, bh + reach_h, bw + reach_w]``); the ops check it. Other devices run
:func:`~effssl_kernels.reference.tile_conv_reference`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import _backend
from ..reference.tile_conv import tile_conv_reference
from ._indices import check_table_range

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def runs_triton(device_type: str) -> bool:
    """Whether the Triton kernels run tensors of ``device_type``: CUDA, or the CPU under
    TRITON_INTERPRET=1 with EFFSSL_BACKEND=triton (tests)."""
    return device_type == "cuda" or (
        device_type == "cpu" and _backend.TRITON_INTERPRET and _backend.backend() == "triton")


def _check_tables(fn: str, tiles: Tensor, kernel: Sequence[int], table: Tensor, table_t: Tensor,
                  dilation: Sequence[int]) -> None:
    """Both tables ``[T, bh + dh*(kh-1), bw + dw*(kw-1)]`` int64: one padded tile per source tile
    (the kernels split source pixels by the output tile's width, which stride 1 makes the
    source's)."""
    if not (isinstance(dilation, (tuple, list)) and len(dilation) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) for d in dilation)):
        raise TypeError(f"{fn}: dilation must be a pair of ints, got {dilation!r}")
    if min(dilation) < 1:
        raise ValueError(f"{fn}: dilation must be two positive ints, got {tuple(dilation)}")
    T, _, bh, bw = tiles.shape
    want = (T, bh + dilation[0] * (kernel[0] - 1), bw + dilation[1] * (kernel[1] - 1))
    for name, t in (("table", table), ("table_t", table_t)):
        if t.dtype != torch.int64 or tuple(t.shape) != want:
            raise ValueError(f"{fn}: {name} must be int64 {list(want)} (each tile with its halo), got "
                             f"{t.dtype} {tuple(t.shape)}")


def _check(tiles: Tensor, weight: Tensor, bias: Optional[Tensor], table: Tensor, table_t: Tensor,
           dilation: Sequence[int]) -> None:
    fn = "tile_conv"
    for name, t in (("tiles", tiles), ("weight", weight), ("table", table), ("table_t", table_t)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if tiles.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{fn}: tiles [T, C, bh, bw] and weight [C_out, C, kh, kw] must be 4-D, got "
                         f"{tuple(tiles.shape)} and {tuple(weight.shape)}")
    if tiles.dtype not in DTYPES or weight.dtype != tiles.dtype:
        raise TypeError(f"{fn}: tiles and weight must share one of float32/float16/bfloat16, got "
                        f"{tiles.dtype} and {weight.dtype}")
    T, C, bh, bw = tiles.shape
    CO, Cw, kh, kw = weight.shape
    if Cw != C:
        raise ValueError(f"{fn}: weight has {Cw} input channels, tiles {C} (groups=1 only)")
    if C == 0 or CO == 0:
        # F.conv2d answers [T, 0, ...] for C = 0 even with C_out > 0, the kernel the bias:
        # refuse rather than pick one (sparse convs without channels take the cudnn path)
        raise ValueError(f"{fn}: needs at least one input and one output channel, got weight "
                         f"{tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (CO,) or bias.dtype != weight.dtype):
        raise ValueError(f"{fn}: bias must be None or a [{CO}] {weight.dtype} tensor")
    _check_tables(fn, tiles, (kh, kw), table, table_t, dilation)
    devs = {t.device for t in (tiles, weight, table, table_t) + ((bias,) if bias is not None else ())}
    if len(devs) != 1:
        raise ValueError(f"{fn}: all tensors must be on one device, got {sorted(map(str, devs))}")


def tile_conv(tiles: Tensor, weight: Tensor, bias: Optional[Tensor], table: Tensor, table_t: Tensor,
              dilation: Sequence[int] = (1, 1)) -> Tensor:
    """Packed tiles ``[T, C, bh, bw]`` (any strides) -> ``[T, C_out, bh, bw]`` channels last:
    the stride-1 conv of each tile with its halo, ``table`` =
    ``TileIndex.halo_table((l, r, t, b))`` and ``table_t`` = ``halo_table((r, l, b, t))``
    (the backward's). float32 (TF32 as cuDNN when allowed)/float16/bfloat16, groups = 1,
    C >= 1 and C_out >= 1 (ValueError otherwise: F.conv2d's answer for C = 0 is a torch quirk).
    Table entries outside ``[0, T*bh*bw + 2)`` raise ValueError for CPU tensors (and CUDA ones
    with ``EFFSSL_CHECK_INDICES=1``; otherwise the kernels read them as zeros)."""
    _check(tiles, weight, bias, table, table_t, dilation)
    _backend.reject_forward_ad("tile_conv", tiles, weight, bias)
    T, _, bh, bw = tiles.shape
    for t in (table, table_t):
        check_table_range(t, T * bh * bw + 2, "tile_conv")
    if not runs_triton(tiles.device.type) or _backend.backend() == "reference":
        return tile_conv_reference(tiles, weight, bias, table, tuple(dilation))
    return torch.ops.effssl_kernels._tile_conv_triton(tiles, weight, bias, table, table_t, list(dilation))


@torch.library.triton_op("effssl_kernels::_tile_conv_triton", mutates_args=())
def _tile_conv_triton(tiles: Tensor, weight: Tensor, bias: Optional[Tensor], table: Tensor, table_t: Tensor,
                      dilation: List[int]) -> Tensor:
    from ..triton.tile_conv import tile_conv_fwd  # lazy: importing triton costs ~2.5 s

    _check_tables("effssl_kernels::_tile_conv_triton", tiles, weight.shape[-2:], table, table_t, dilation)
    return tile_conv_fwd(tiles, weight, bias, table, (dilation[0], dilation[1]))


@torch.library.triton_op("effssl_kernels::_tile_conv_wgrad_triton", mutates_args=())
def _tile_conv_wgrad_triton(grad: Tensor, tiles: Tensor, table: Tensor, table_t: Tensor, kh: int, kw: int,
                            dilation: List[int]) -> Tensor:
    # table_t is not read here: the double backward needs it (the input gradient of a conv)
    from ..triton.tile_conv import tile_conv_wgrad

    _check_tables("effssl_kernels::_tile_conv_wgrad_triton", tiles, (kh, kw), table, table_t, dilation)
    return tile_conv_wgrad(grad, tiles, table, (kh, kw), (dilation[0], dilation[1]))


def _fake(tiles, weight, bias, table, table_t, dilation):
    kh, kw = weight.shape[-2:]
    out = (table.shape[0], weight.shape[0], table.shape[1] - dilation[0] * (kh - 1),
           table.shape[2] - dilation[1] * (kw - 1))
    return tiles.new_empty(out).contiguous(memory_format=torch.channels_last)


def _fake_wgrad(grad, tiles, table, table_t, kh, kw, dilation):
    return tiles.new_empty((grad.shape[1], tiles.shape[1], kh, kw), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    tiles, weight, bias, table, table_t, dilation = inputs
    ctx.save_for_backward(tiles, weight, table, table_t)
    ctx.dilation = list(dilation)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    tiles, weight, table, table_t = ctx.saved_tensors
    g_tiles = g_weight = g_bias = None
    if ctx.needs_input_grad[0]:
        # stride 1: the input gradient is a conv of the output gradient with the flipped,
        # transposed kernel over the mirrored halo; removed blocks read as zeros both ways
        w_t = weight.flip(2, 3).transpose(0, 1)
        g_tiles = torch.ops.effssl_kernels._tile_conv_triton(grad.to(tiles.dtype), w_t, None, table_t, table,
                                                             ctx.dilation)
    if ctx.needs_input_grad[1]:
        kh, kw = weight.shape[-2:]
        g_weight = torch.ops.effssl_kernels._tile_conv_wgrad_triton(grad, tiles, table, table_t, kh, kw,
                                                                    ctx.dilation).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        g_bias = grad.sum((0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
    return g_tiles, g_weight, g_bias, None, None, None


def _setup_context_wgrad(ctx, inputs, output):
    grad, tiles, table, table_t, kh, kw, dilation = inputs
    ctx.save_for_backward(grad, tiles, table, table_t)
    ctx.dilation = list(dilation)


def _wgrad_backward(ctx, g_w):
    """dW = sum_m grad[m] (x) X_tap[m] is bilinear: its cotangent g_w [CO, C, kh, kw] gives
    d grad = conv(tiles, g_w) and d tiles = the input gradient of that conv at grad."""
    grad, tiles, table, table_t = ctx.saved_tensors
    g_w = g_w.to(tiles.dtype)
    d_grad = d_tiles = None
    if ctx.needs_input_grad[0]:
        d_grad = torch.ops.effssl_kernels._tile_conv_triton(tiles, g_w, None, table, table_t,
                                                            ctx.dilation).to(grad.dtype)
    if ctx.needs_input_grad[1]:
        d_tiles = torch.ops.effssl_kernels._tile_conv_triton(grad.to(tiles.dtype), g_w.flip(2, 3).transpose(0, 1),
                                                             None, table_t, table, ctx.dilation)
    return d_grad, d_tiles, None, None, None, None, None


_tile_conv_wgrad_triton.register_autograd(_wgrad_backward, setup_context=_setup_context_wgrad)
_tile_conv_triton.register_autograd(_backward, setup_context=_setup_context)
_backend.register_interpreter_fakes((_tile_conv_triton, _fake), (_tile_conv_wgrad_triton, _fake_wgrad))


def _flops(tiles_shape, weight_shape, bias_shape, table_shape, table_t_shape, dilation, out_shape=None):
    """A conv's: each output value is a dot over C * kh * kw (the kept tiles only)."""
    _, C, kh, kw = weight_shape
    T, CO, oh, ow = out_shape
    return 2 * T * CO * oh * ow * C * kh * kw


def _flops_wgrad(grad_shape, tiles_shape, table_shape, table_t_shape, kh, kw, dilation, out_shape=None):
    """The weight gradient's: each output pixel's gradient times its C * kh * kw inputs."""
    T, CO, oh, ow = grad_shape
    return 2 * T * CO * oh * ow * tiles_shape[1] * kh * kw


_backend.register_flops([torch.ops.effssl_kernels._tile_conv_triton], _flops)
_backend.register_flops([torch.ops.effssl_kernels._tile_conv_wgrad_triton], _flops_wgrad)
