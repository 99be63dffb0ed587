"""halo_gather: the op under ``effssl_kernels.sparse.halo_gather``, its registrations, autograd.

Two ops, each with a fake impl and autograd so ``torch.compile(fullgraph=True)`` traces forward
and backward with a data-dependent tile count: the C++ op ``effssl_kernels::halo_gather`` (CPU
kernel, schema in csrc/bindings.cpp) with ``effssl_kernels::halo_gather_backward``, and the
Triton op ``effssl_kernels::_halo_gather_triton`` (CUDA tensors; CPU only under
TRITON_INTERPRET=1) with ``_halo_gather_backward_triton``. Both backwards are deterministic
gathers over the inverse table (no atomics). The backwards are linear in ``grad`` and have
autograd too (double backward: gradient penalties, meta-learning): the backward of the backward
is the forward gather, with the table rebuilt from its inverse. The table and its inverse come
from :meth:`effssl_kernels.sparse.TileIndex.halo_table` / ``halo_inverse``; their shapes are
checked by every registration (fakes and Triton ops too), their values as they are read: an
entry out of range raises on the CPU and gives NaN in Triton, never a wild read.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from ..reference.halo_gather import halo_gather_backward_reference, halo_gather_reference


def halo_gather_op(tiles: Tensor, table: Tensor, order: Tensor, offsets: Tensor,
                   outside: float = 0.0) -> Tensor:
    """Source ``[T, C, bh, bw]`` (float32/16/bf16/64, any strides), table ``[R, ph, pw]`` ->
    ``[R, C, ph, pw]`` channels last, as
    :func:`~effssl_kernels.reference.halo_gather.halo_gather_reference`; differentiable in
    ``tiles`` (reverse mode; a forward-mode tangent raises NotImplementedError)."""
    _backend.reject_forward_ad("halo_gather", tiles)
    which = _backend.choose(tiles.device.type, cuda_kernel=False)
    if which == "reference":
        return halo_gather_reference(tiles, table, outside)
    if which == "triton":
        return torch.ops.effssl_kernels._halo_gather_triton(tiles, table, order, offsets,
                                                            float(outside))
    return torch.ops.effssl_kernels.halo_gather.default(tiles, table, order, offsets,
                                                        float(outside))


def halo_gather_backward_op(grad: Tensor, order: Tensor, offsets: Tensor, num_tiles: int, bh: int,
                            bw: int) -> Tensor:
    """The adjoint of :func:`halo_gather_op` (its backward, for callers that regather the halo in
    their own backward): ``grad`` ``[R, C, ph, pw]`` -> ``[num_tiles, C, bh, bw]``, each source
    pixel the sum of the grads of the padded pixels that read it (the runs of the inverse table
    ``order, offsets``). The same backend as the forward; differentiable in ``grad``."""
    which = _backend.choose(grad.device.type, cuda_kernel=False)
    if which == "reference":
        table = _table_from_inverse(order, offsets, (grad.shape[0], grad.shape[2], grad.shape[3]))
        return halo_gather_backward_reference(grad, table, num_tiles, bh, bw)
    if which == "triton":
        return torch.ops.effssl_kernels._halo_gather_backward_triton(grad, order, offsets, num_tiles, bh, bw)
    return torch.ops.effssl_kernels.halo_gather_backward.default(grad, order, offsets, num_tiles, bh, bw)


# ----------------------------------------------------------------------------- checks, fake impls, autograd
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_vectors(fn: str, order, offsets) -> None:
    if not all(isinstance(t, Tensor) and t.dtype == torch.int64 and t.dim() == 1 for t in (order, offsets)):
        raise ValueError(f"{fn}: order and offsets must be 1-D int64 tensors")


def _check_inverse(fn: str, order, offsets, padded_pixels, num_tiles: int, bh: int, bw: int) -> None:
    _check_vectors(fn, order, offsets)
    if num_tiles < 0 or bh < 1 or bw < 1 or num_tiles * bh * bw >= 2**63 - 1:
        raise ValueError(f"{fn}: bad tile shape {num_tiles} x {bh} x {bw}")
    if offsets.shape[0] != num_tiles * bh * bw + 1 or order.shape[0] > padded_pixels:
        raise ValueError(f"{fn}: order [{order.shape[0]}] / offsets [{offsets.shape[0]}] do not match "
                         f"{padded_pixels} padded pixels and {num_tiles} tiles of {bh} x {bw}")


def _check(tiles, table, order, offsets) -> None:
    """The op's arguments, but the table's values (what the C++ kernel checks as it reads them;
    the Triton kernel writes NaN for a bad entry): run by the fakes and the Triton op, so a direct
    op call fails as the C++ one would."""
    fn = "halo_gather"
    if not isinstance(tiles, Tensor) or tiles.dim() != 4 or tiles.dtype not in _FLOATS:
        raise ValueError(f"{fn}: tiles must be a 4-D [T, C, bh, bw] float tensor")
    if not isinstance(table, Tensor) or table.dtype != torch.int64 or table.dim() != 3:
        raise ValueError(f"{fn}: table must be a 3-D [R, ph, pw] int64 tensor")
    _check_vectors(fn, order, offsets)  # their sizes matter to the backward only
    if not all(t.device == tiles.device for t in (table, order, offsets)):
        raise ValueError(f"{fn}: table, order and offsets must be on the device of tiles")


def _check_backward(grad, order, offsets, num_tiles, bh, bw) -> None:
    fn = "halo_gather_backward"
    if not isinstance(grad, Tensor) or grad.dim() != 4 or grad.dtype not in _FLOATS:
        raise ValueError(f"{fn}: grad must be a 4-D [R, C, ph, pw] float tensor")
    R, _, ph, pw = grad.shape
    _check_inverse(fn, order, offsets, R * ph * pw, num_tiles, bh, bw)
    if not all(t.device == grad.device for t in (order, offsets)):
        raise ValueError(f"{fn}: order and offsets must be on the device of grad")


def _channels_last_empty(like: Tensor, shape) -> Tensor:
    # torch.empty(memory_format=...), not .contiguous(memory_format=...): the kernels' strides
    # for C == 1 too (where .contiguous keeps the NCHW ones)
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _fake(tiles, table, order, offsets, outside):
    _check(tiles, table, order, offsets)
    return _channels_last_empty(tiles, (table.shape[0], tiles.shape[1], table.shape[1], table.shape[2]))


def _fake_backward(grad, order, offsets, num_tiles, bh, bw):
    _check_backward(grad, order, offsets, num_tiles, bh, bw)
    return _channels_last_empty(grad, (num_tiles, grad.shape[1], bh, bw))


def _setup_context(ctx, inputs, output):
    tiles, table, order, offsets, outside = inputs
    ctx.save_for_backward(order, offsets)
    ctx.tile = (tiles.shape[0], tiles.shape[2], tiles.shape[3])


def _make_backward(backward_op):
    def _backward(ctx, grad):
        order, offsets = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        return backward_op(grad, order, offsets, *ctx.tile), None, None, None, None

    return _backward


def _setup_context_backward(ctx, inputs, output):
    grad, order, offsets, num_tiles, bh, bw = inputs
    ctx.save_for_backward(order, offsets)
    ctx.padded = (grad.shape[0], grad.shape[2], grad.shape[3])


def _table_from_inverse(order: Tensor, offsets: Tensor, padded) -> Tensor:
    """The forward table ``[R, ph, pw]`` from its inverse (order, offsets), without a host sync:
    ``order[j]`` reads source ``s`` for ``offsets[s] <= j < offsets[s + 1]``. The entries past
    the last run (zero or outside row in the forward) all become the zero row ``S``: the fill
    is a constant, so its gradient is zero."""
    S = offsets.numel() - 1
    j = torch.arange(order.numel(), device=order.device, dtype=offsets.dtype)
    src = torch.searchsorted(offsets, j, right=True) - 1  # S past offsets[S]
    return torch.full_like(order, S).scatter(0, order, src).view(*padded)


def _make_double_backward(forward_op):
    """Autograd of a backward op: it is linear in ``grad`` (the transpose of the gather), so its
    backward is the gather itself, ``halo_gather(gg, table, order, offsets, outside=0)``."""
    def _backward(ctx, gg):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        order, offsets = ctx.saved_tensors
        table = _table_from_inverse(order, offsets, ctx.padded)
        return forward_op(gg, table, order, offsets, 0.0), None, None, None, None, None

    return _backward


_backend.register_ext_op_pair("halo_gather", _fake, "halo_gather_backward", _fake_backward, _make_backward,
                             _setup_context)
if _backend.HAS_EXT:
    torch.library.register_autograd(
        "effssl_kernels::halo_gather_backward",
        _make_double_backward(torch.ops.effssl_kernels.halo_gather.default),
        setup_context=_setup_context_backward)


@torch.library.triton_op("effssl_kernels::_halo_gather_triton", mutates_args=())
def _halo_gather_triton(tiles: Tensor, table: Tensor, order: Tensor, offsets: Tensor,
                        outside: float) -> Tensor:
    from ..triton.halo_gather import halo_gather_fwd  # lazy: importing triton costs ~2.5 s

    _check(tiles, table, order, offsets)
    return halo_gather_fwd(tiles, table, outside)


@torch.library.triton_op("effssl_kernels::_halo_gather_backward_triton", mutates_args=())
def _halo_gather_backward_triton(grad: Tensor, order: Tensor, offsets: Tensor, num_tiles: int,
                                 bh: int, bw: int) -> Tensor:
    from ..triton.halo_gather import halo_gather_bwd

    _check_backward(grad, order, offsets, num_tiles, bh, bw)
    return halo_gather_bwd(grad, order, offsets, num_tiles, bh, bw)


_halo_gather_triton.register_autograd(
    _make_backward(torch.ops.effssl_kernels._halo_gather_backward_triton.default),
    setup_context=_setup_context,
)
_halo_gather_backward_triton.register_autograd(
    _make_double_backward(torch.ops.effssl_kernels._halo_gather_triton.default),
    setup_context=_setup_context_backward,
)

_backend.register_interpreter_fakes((_halo_gather_triton, _fake),
                                    (_halo_gather_backward_triton, _fake_backward))
