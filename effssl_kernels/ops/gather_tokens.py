"""gather_tokens: the public function, its checks, op registrations and autograd.

Two ops, each with a fake impl and autograd so ``torch.compile(fullgraph=True)`` traces forward
and backward: the C++ op ``effssl_kernels::gather_tokens`` (CPU kernel, schema in
csrc/bindings.cpp) with its backward op ``effssl_kernels::gather_tokens_backward``, and the
Triton op ``effssl_kernels::_gather_tokens_triton`` (CUDA tensors; CPU only under
TRITON_INTERPRET=1) with ``_gather_tokens_backward_triton``. There is no CUDA C++ kernel: CUDA tensors
run Triton (``_backend.choose(..., cuda_kernel=False)``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..reference.gather_tokens import gather_tokens_reference
from ._indices import check_keep_range

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def pos_embed_fits(pos_embed: Tensor, L, D) -> bool:
    """``pos_embed`` is ``[1, L, D]`` or ``[L, D]``. Compared size by size: ``tuple(shape) in
    ((1, L, D), (L, D))`` is misjudged by the Dynamo of torch < 2.14 under symbolic sizes (a
    dynamic-size ViT compiled under token_keep failed at its second image size there)."""
    d = pos_embed.dim()
    return ((d == 2 or (d == 3 and pos_embed.shape[0] == 1))
            and pos_embed.shape[-2] == L and pos_embed.shape[-1] == D)


def _check(x, keep, pos_embed) -> None:
    if not isinstance(x, Tensor) or not isinstance(keep, Tensor):
        raise TypeError("gather_tokens: x and keep must be tensors")
    if x.dtype not in _DTYPES:
        raise TypeError(f"gather_tokens: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"gather_tokens: x must be 3-D [N, L, D], got shape {tuple(x.shape)}")
    if keep.dtype not in _INDEX_DTYPES:
        raise TypeError(f"gather_tokens: keep must be an int32 or int64 tensor, got {keep.dtype}")
    if keep.dim() != 2:
        raise ValueError(f"gather_tokens: keep must be 2-D [N, K], got shape {tuple(keep.shape)}")
    N, L, D = x.shape
    if keep.shape[0] != N:
        raise ValueError(f"gather_tokens: keep has batch {keep.shape[0]} but x has {N}")
    if keep.shape[1] == 0:
        raise ValueError("gather_tokens: keep must keep at least one token (K >= 1)")
    if L == 0:
        raise ValueError("gather_tokens: x must have at least one token (L >= 1)")
    if keep.device != x.device:
        raise ValueError(f"gather_tokens: keep must be on {x.device}, got {keep.device}")
    if pos_embed is not None:
        if not isinstance(pos_embed, Tensor):
            raise TypeError("gather_tokens: pos_embed must be a tensor or None")
        if pos_embed.dtype not in _DTYPES:
            raise TypeError(
                f"gather_tokens: pos_embed must be float32, float64, float16 or bfloat16, got {pos_embed.dtype}"
            )
        if not pos_embed_fits(pos_embed, L, D):
            raise ValueError(
                f"gather_tokens: pos_embed must have shape [1, L, D] or [L, D] with L={L}, D={D}, "
                f"got {tuple(pos_embed.shape)}"
            )
        if pos_embed.device != x.device:
            raise ValueError(f"gather_tokens: pos_embed must be on {x.device}, got {pos_embed.device}")



def gather_tokens(x: Tensor, keep: Tensor, pos_embed: Optional[Tensor] = None) -> Tensor:
    """Gather kept tokens and add their positional embedding: timm's PatchDropout gather, fused.

    ``out[n, k] = x[n, keep[n, k]] + pos_embed[keep[n, k]]``.

    Args:
        x: ``[N, L, D]`` float32, float64, float16 or bfloat16, any strides (read in place).
        keep: int32 or int64 ``[N, K]``, ``K >= 1``, values in ``[0, L)``; duplicates allowed.
        pos_embed: ``[1, L, D]``, ``[L, D]`` or None, float32/float64/float16/bfloat16, on x's
            device.

    Returns:
        ``[N, K, D]`` contiguous, dtype ``torch.promote_types(x.dtype, pos_embed.dtype)`` (x's
        without pos_embed): one float32 add (float64 when either is float64) and one rounding,
        as timm's ``gather + add``. Backward gives ``grad_x`` (zeros at dropped tokens,
        duplicates summed) and ``grad_pos`` (summed over the batch, in pos_embed's shape and
        dtype), each only when needed, accumulated in float32 (float64 for float64) and
        deterministic on every backend; differentiable again (double backward).

    AMP: the op casts nothing; it follows its inputs' dtypes (bfloat16 tokens + float32
    pos_embed give float32, as timm under autocast).

    Index range (effssl_kernels/ops/_indices.py): CPU tensors raise ValueError; CUDA tensors get
    a device-side assert (no host sync; ``EFFSSL_CHECK_INDICES=1`` checks on the host instead);
    inside ``torch.compile`` nothing is checked, and the Triton kernel still reads nothing out of
    bounds: an out-of-range index gives a NaN output row and no gradient.

    Raises TypeError/ValueError on bad dtypes, shapes, K = 0, devices or indices. Matches
    ``effssl_kernels.reference.gather_tokens_reference``.
    """
    return _gather_tokens(x, keep, pos_embed, check_range=True)


def _gather_tokens(x: Tensor, keep: Tensor, pos_embed: Optional[Tensor], check_range: bool) -> Tensor:
    """``gather_tokens``; ``check_range=False`` skips the host / device-assert range check for a
    caller that has checked ``keep`` already (``token_keep``). The C++ kernel checks every index
    as it reads it whatever the flag; Triton writes NaN rows for a bad index."""
    _check(x, keep, pos_embed)
    _backend.reject_forward_ad("gather_tokens", x, pos_embed)
    L = x.shape[1]
    which = _backend.choose(x.device.type, cuda_kernel=False)
    if check_range and which != "cpp":  # the C++ kernel checks every index as it reads it
        check_keep_range(keep, L, "gather_tokens")
    if which == "reference":
        return gather_tokens_reference(x, keep, pos_embed)
    pos = None if pos_embed is None else pos_embed.reshape(L, x.shape[2])  # a view: both shapes
    if which == "triton":
        return torch.ops.effssl_kernels._gather_tokens_triton(x, keep, pos)
    return torch.ops.effssl_kernels.gather_tokens.default(x, keep, pos)


def _check_backward(grad, keep, num_tokens, x_dtype, pos_dtype) -> None:
    """The backward op's arguments (what its C++ kernel checks, but the index values)."""
    op = "gather_tokens_backward"
    if not isinstance(grad, Tensor) or grad.dim() != 3 or grad.dtype not in _DTYPES:
        raise ValueError(f"{op}: grad must be a 3-D [N, K, D] float tensor")
    if not isinstance(keep, Tensor) or keep.dtype not in _INDEX_DTYPES or tuple(keep.shape) != tuple(grad.shape[:2]):
        raise ValueError(f"{op}: keep must be an int32/int64 [N, K] = {list(grad.shape[:2])} tensor")
    if keep.device != grad.device:
        raise ValueError(f"{op}: keep must be on {grad.device}, got {keep.device}")
    if num_tokens < 1:
        raise ValueError(f"{op}: num_tokens must be at least 1, got {num_tokens}")
    if x_dtype not in _DTYPES or pos_dtype not in _DTYPES:
        raise TypeError(f"{op}: x_dtype and pos_dtype must be float types, got {x_dtype} and {pos_dtype}")


# ----------------------------------------------------------------------------- fake impls, autograd
# The fakes and the Triton ops run the checks too: a direct op call (or one traced by compile or
# export) must fail as the C++ kernel would, not trace or read out of bounds.
def _fake(x, keep, pos_embed):
    _check(x, keep, pos_embed)
    dtype = x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)
    return x.new_empty((x.shape[0], keep.shape[1], x.shape[2]), dtype=dtype)


def _fake_backward(grad, keep, num_tokens, x_dtype, pos_dtype, need_x, need_pos):
    _check_backward(grad, keep, num_tokens, x_dtype, pos_dtype)
    N, _, D = grad.shape
    gx = grad.new_empty((N, num_tokens, D) if need_x else (0,), dtype=x_dtype)
    gpos = grad.new_empty((num_tokens, D) if need_pos else (0,), dtype=pos_dtype)
    return gx, gpos


def _setup_context(ctx, inputs, output):
    x, keep, pos = inputs
    ctx.save_for_backward(keep)
    ctx.num_tokens = x.shape[1]
    ctx.x_dtype = x.dtype
    ctx.pos_dtype = None if pos is None else pos.dtype


def _make_backward(backward_op):
    def _backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        need_pos = ctx.pos_dtype is not None and ctx.needs_input_grad[2]
        if not (need_x or need_pos):
            return None, None, None
        gx, gpos = backward_op(
            grad, keep, ctx.num_tokens, ctx.x_dtype, ctx.pos_dtype or ctx.x_dtype, need_x, need_pos
        )
        return (gx if need_x else None), None, (gpos if need_pos else None)

    return _backward


def _setup_context_backward(ctx, inputs, output):
    grad, keep, num_tokens, x_dtype, pos_dtype, need_x, need_pos = inputs
    ctx.save_for_backward(keep)
    ctx.grad_dtype, ctx.need = grad.dtype, (need_x, need_pos)


def _make_double_backward(forward_op):
    """Autograd of a backward op: it is linear in ``grad`` (the transpose of the gather), so its
    backward gathers the incoming gradients again, ``ggx[n, keep[n, k]] + ggpos[keep[n, k]]``."""
    def _backward(ctx, ggx, ggpos):
        nones = (None,) * 6
        if not ctx.needs_input_grad[0]:
            return (None,) + nones
        (keep,) = ctx.saved_tensors
        ggx = ggx if ctx.need[0] else None  # an unneeded output is an empty placeholder
        ggpos = ggpos if ctx.need[1] else None
        if ggx is not None:
            gg = forward_op(ggx, keep, ggpos)
        elif ggpos is not None:
            gg = ggpos.index_select(0, keep.reshape(-1)).view(*keep.shape, ggpos.shape[-1])
        else:
            return (None,) + nones
        return (gg.to(ctx.grad_dtype),) + nones

    return _backward


_backend.register_ext_op_pair("gather_tokens", _fake, "gather_tokens_backward", _fake_backward, _make_backward,
                             _setup_context)
if _backend.HAS_EXT:
    torch.library.register_autograd(
        "effssl_kernels::gather_tokens_backward",
        _make_double_backward(torch.ops.effssl_kernels.gather_tokens.default),
        setup_context=_setup_context_backward)


@torch.library.triton_op("effssl_kernels::_gather_tokens_triton", mutates_args=())
def _gather_tokens_triton(x: Tensor, keep: Tensor, pos_embed: Optional[Tensor]) -> Tensor:
    from ..triton.gather_tokens import gather_tokens_fwd  # lazy: importing triton costs ~2.5 s

    _check(x, keep, pos_embed)
    return gather_tokens_fwd(x, keep, pos_embed)


@torch.library.triton_op("effssl_kernels::_gather_tokens_backward_triton", mutates_args=())
def _gather_tokens_backward_triton(
    grad: Tensor,
    keep: Tensor,
    num_tokens: int,
    x_dtype: torch.dtype,
    pos_dtype: torch.dtype,
    need_x: bool,
    need_pos: bool,
) -> tuple[Tensor, Tensor]:
    from ..triton.gather_tokens import gather_tokens_bwd

    _check_backward(grad, keep, num_tokens, x_dtype, pos_dtype)
    return gather_tokens_bwd(grad, keep, num_tokens, x_dtype, pos_dtype, need_x, need_pos)


_gather_tokens_triton.register_autograd(
    _make_backward(torch.ops.effssl_kernels._gather_tokens_backward_triton.default),
    setup_context=_setup_context,
)
_gather_tokens_backward_triton.register_autograd(
    _make_double_backward(torch.ops.effssl_kernels._gather_tokens_triton.default),
    setup_context=_setup_context_backward,
)

_backend.register_interpreter_fakes((_gather_tokens_triton, _fake), (_gather_tokens_backward_triton, _fake_backward))
