"""patch_embed_gather: timm's patch embedding + pos_embed + token gather, for kept patches only.

Ops registered here (schemas of the C++ ones in csrc/bindings.cpp):
- ``effssl_kernels::patch_embed_gather`` (C++ CPU kernel: gather of the kept patches, one GEMM,
  ``pos_embed[keep]`` fused) with a fake impl and autograd;
- ``effssl_kernels::_gather_patches`` / ``_scatter_patches`` (C++ CPU: im2col of the kept patches
  and its adjoint), the pieces of the CPU backward;
- ``effssl_kernels::_patch_embed_gather_triton`` / ``_gather_patches_triton`` (Triton, the path
  of CUDA tensors: there is no CUDA C++ kernel for this op).
The backward is plain torch around these ops, so ``torch.compile(fullgraph=True)`` traces it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..reference.gather_tokens import patch_embed_gather_reference
from ._indices import check_keep_range
from .gather_tokens import pos_embed_fits

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check(images, weight, bias, keep, pos_embed) -> None:
    op = "patch_embed_gather"
    for name, t in (("images", images), ("weight", weight), ("keep", keep)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("pos_embed", pos_embed)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
    for name, t in (("images", images), ("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
        if t is not None and t.dtype not in _FLOATS:
            raise TypeError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if keep.dtype not in _INTS:
        raise TypeError(f"{op}: keep must be an integer tensor, got {keep.dtype}")
    if images.dim() != 4:
        raise ValueError(f"{op}: images must be 4-D [N, C, H, W], got {tuple(images.shape)}")
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"{op}: weight must be [D, C, p, p] with square p x p patches, got {tuple(weight.shape)}")
    N, C, H, W = images.shape
    D, p = weight.shape[0], weight.shape[-1]
    if p < 1 or D < 1:
        raise ValueError(f"{op}: weight must have D >= 1 and p >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != C:
        raise ValueError(f"{op}: weight has {weight.shape[1]} input channels, images have {C}")
    if H % p or W % p:
        raise ValueError(f"{op}: H and W ({H}x{W}) must be divisible by the patch size {p}")
    L = (H // p) * (W // p)
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"{op}: bias must have shape [D] = [{D}], got {tuple(bias.shape)}")
    if keep.dim() != 2 or keep.shape[0] != N:
        raise ValueError(f"{op}: keep must have shape [N, K] with N = {N}, got {tuple(keep.shape)}")
    if keep.shape[1] < 1:
        raise ValueError(f"{op}: keep must keep at least one patch (K >= 1)")
    if pos_embed is not None and not pos_embed_fits(pos_embed, L, D):
        raise ValueError(
            f"{op}: pos_embed must have shape [1, L, D] or [L, D] with L = {L}, D = {D}, got {tuple(pos_embed.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias), ("keep", keep), ("pos_embed", pos_embed)):
        if t is not None and t.device != images.device:
            raise ValueError(f"{op}: {name} must be on {images.device}, got {t.device}")


def _gemm_inputs(images: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Cast the GEMM inputs as timm's conv sees them: under torch.autocast each float input but
    float64 becomes the autocast dtype (F.conv2d's rule), then all promote to one dtype. Only
    weight and bias are cast here; images are converted by the kernels as they gather the kept
    patches (the same rounding, on a fraction of the pixels)."""
    dev = images.device.type
    img_dt, w_dt, b_dt = images.dtype, weight.dtype, None if bias is None else bias.dtype
    if torch.is_autocast_enabled(dev):
        ac = torch.get_autocast_dtype(dev)
        img_dt, w_dt = (ac if d != torch.float64 else d for d in (img_dt, w_dt))
        b_dt = None if b_dt is None else (ac if b_dt != torch.float64 else b_dt)
    dt = torch.promote_types(img_dt, w_dt)
    if b_dt is not None:
        dt = torch.promote_types(dt, b_dt)
    if img_dt != images.dtype and img_dt != dt:  # autocast rounding first, then a wider GEMM dtype
        images = images.to(img_dt)
    return images, weight.to(dt), None if bias is None else bias.to(dt)


def patch_embed_gather(
    images: Tensor, weight: Tensor, bias: Optional[Tensor], keep: Tensor, pos_embed: Optional[Tensor] = None
) -> Tensor:
    """Patch-embed (conv with kernel = stride = p) only the kept patches, add their pos_embed.

    Equals ``gather_tokens(patch_embed(images), keep, pos_embed)``:
    ``out[n, k] = images[n, :, patch keep[n, k]] . weight + bias + pos_embed[keep[n, k]]``.

    Args:
        images: ``[N, C, H, W]``, H and W divisible by p; any strides (channels_last, slices).
        weight: ``[D, C, p, p]`` (timm's ``PatchEmbed.proj.weight``); bias ``[D]`` or None.
        keep: integer ``[N, K]``, ``K >= 1``, indices into the ``L = (H/p)(W/p)`` patches in
            row-major order; duplicates allowed (their gradients add up).
        pos_embed: ``[1, L, D]``, ``[L, D]`` (patch tokens only) or None.

    Returns ``[N, K, D]``. The GEMM runs in the promoted dtype of images, weight and bias (float
    accumulation); pos_embed is then added with type promotion, as timm's path gives. Under
    ``torch.autocast`` the GEMM inputs are cast like ``F.conv2d``'s (float64 excepted), in this
    Python wrapper (not a torch.library autocast rule, which would also cast pos_embed): bf16
    tokens + fp32 pos_embed give fp32, as in timm. float32/float64/float16/bfloat16; CPU (C++)
    and CUDA (Triton; float32 uses TF32 when ``torch.backends.cudnn.allow_tf32``, as the conv).

    Raises TypeError/ValueError on bad types, shapes, devices or sizes. An index outside
    ``[0, L)``: ValueError for CPU tensors (RuntimeError from the C++ kernel inside
    torch.compile); on CUDA a device-side assert (as torch indexing), and inside torch.compile
    the Triton kernel writes NaN rows instead of reading out of bounds.
    Differentiable in images, weight, bias, pos_embed, twice over (grads of images and pos_embed
    are scatters that sum duplicates in float32; deterministic on CPU).
    Matches ``effssl_kernels.reference.patch_embed_gather_reference``.
    """
    return _patch_embed_gather(images, weight, bias, keep, pos_embed, check_range=True)


def _patch_embed_gather(
    images: Tensor, weight: Tensor, bias: Optional[Tensor], keep: Tensor, pos_embed: Optional[Tensor],
    check_range: bool,
) -> Tensor:
    """``patch_embed_gather``; ``check_range=False`` skips the host / device-assert range check
    for a caller that has checked ``keep`` already (``token_keep``). The C++ kernel still checks
    each index as it reads it; Triton writes NaN rows for a bad index."""
    _check(images, weight, bias, keep, pos_embed)
    _backend.reject_forward_ad("patch_embed_gather", images, weight, bias, pos_embed)
    images, weight, bias = _gemm_inputs(images, weight, bias)
    if keep.dtype not in (torch.int32, torch.int64):
        keep = keep.long()
    if check_range:
        L = (images.shape[2] // weight.shape[-1]) * (images.shape[3] // weight.shape[-1])
        check_keep_range(keep, L, "patch_embed_gather")
    which = _backend.choose(images.device.type, cuda_kernel=False)
    if which == "reference":
        return patch_embed_gather_reference(images.to(weight.dtype), weight, bias, keep, pos_embed)
    if which == "triton":
        return torch.ops.effssl_kernels._patch_embed_gather_triton(images, weight, bias, keep, pos_embed)
    return torch.ops.effssl_kernels.patch_embed_gather.default(images, weight, bias, keep, pos_embed)


# ----------------------------------------------------------------------------- fake impls
def _out_dtype(weight: Tensor, pos_embed: Optional[Tensor]) -> torch.dtype:
    return weight.dtype if pos_embed is None else torch.promote_types(weight.dtype, pos_embed.dtype)


# The fakes and the Triton ops run the checks too: a direct op call (or one traced by compile or
# export) must fail as the C++ kernel would, not trace or read out of bounds.
def _check_patches(op: str, images, keep, patch_size) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.dtype not in _FLOATS:
        raise ValueError(f"{op}: images must be a 4-D float tensor")
    if patch_size < 1 or images.shape[2] % patch_size or images.shape[3] % patch_size:
        raise ValueError(f"{op}: H and W ({images.shape[2]}x{images.shape[3]}) must be divisible by the "
                         f"positive patch size {patch_size}")
    if not isinstance(keep, Tensor) or keep.dtype not in (torch.int32, torch.int64) or keep.dim() != 2 \
            or keep.shape[0] != images.shape[0]:
        raise ValueError(f"{op}: keep must be an int32/int64 [N, K] tensor with N = {images.shape[0]}")


def _fake(images, weight, bias, keep, pos_embed):
    _check(images, weight, bias, keep, pos_embed)
    return images.new_empty((images.shape[0], keep.shape[1], weight.shape[0]), dtype=_out_dtype(weight, pos_embed))


def _fake_gather(images, keep, patch_size, dtype):
    _check_patches("_gather_patches", images, keep, patch_size)
    return images.new_empty((images.shape[0], keep.shape[1], images.shape[1] * patch_size**2), dtype=dtype)


def _fake_scatter(cols, keep, patch_size, height, width, dtype):
    if patch_size < 1 or cols.dim() != 3 or cols.shape[2] == 0 or cols.shape[2] % patch_size**2 \
            or height < 0 or width < 0 or height % patch_size or width % patch_size:
        raise ValueError("_scatter_patches: cols must be [N, K, C*p*p] and height, width non-negative "
                         "multiples of a positive patch size")
    if tuple(keep.shape) != tuple(cols.shape[:2]):
        raise ValueError(f"_scatter_patches: keep must be [N, K] = {list(cols.shape[:2])}")
    return cols.new_empty((cols.shape[0], cols.shape[2] // patch_size**2, height, width), dtype=dtype)


# ----------------------------------------------------------------------------- autograd
def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _scatter_rows(rows: Tensor, keep: Tensor, num_rows: int, dtype: torch.dtype) -> Tensor:
    """``out[l] = sum of rows[n, k] over keep[n, k] == l``: rows ``[N, K, E]`` -> ``[num_rows, E]``
    in ``dtype``, summed in float32 (float64 for float64)."""
    E = rows.shape[-1]
    acc = _acc_dtype(rows.dtype, dtype)
    buf = rows.new_zeros((num_rows, E), dtype=acc)
    buf = buf.index_put((keep.reshape(-1).long(),), rows.reshape(-1, E).to(acc), accumulate=True)
    return buf.to(dtype)


def _scatter_patches_torch(cols: Tensor, keep: Tensor, patch_size: int, H: int, W: int, dtype: torch.dtype) -> Tensor:
    """Adjoint of the gather: cols ``[N, K, C*p*p]`` -> ``[N, C, H, W]`` in ``dtype``, duplicates
    summed in float32 (float64 for float64)."""
    N, K, KD = cols.shape
    p = int(patch_size)
    C, Hp, Wp = KD // (p * p), H // p, W // p
    L = Hp * Wp
    flat = torch.arange(N, device=keep.device).unsqueeze(1) * L + keep.long()  # row of [N * L]
    buf = _scatter_rows(cols, flat, N * L, _acc_dtype(cols.dtype, dtype))
    img = buf.view(N, Hp, Wp, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(N, C, H, W)
    return img.to(dtype)


def _setup_context(ctx, inputs, output, triton=False):
    images, weight, bias, keep, pos_embed = inputs
    need_images, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # images only for the weight gradient, weight only for the image gradient
    ctx.save_for_backward(images if need_weight else None, weight if need_images else None, keep)
    ctx.images_meta = (tuple(images.shape), images.dtype)
    ctx.weight_shape = tuple(weight.shape)
    ctx.gemm_dtype = weight.dtype
    ctx.pos_meta = None if pos_embed is None else (tuple(pos_embed.shape), pos_embed.dtype)
    ctx.triton = triton  # which gather the backward uses: the Triton one or the C++ one


def _setup_context_triton(ctx, inputs, output):
    _setup_context(ctx, inputs, output, triton=True)


def _backward(ctx, grad):
    images, weight, keep = ctx.saved_tensors
    (N, C, H, W), img_dtype = ctx.images_meta
    D, _, p, _ = ctx.weight_shape
    K = keep.shape[1]
    dt = ctx.gemm_dtype
    need_images, need_weight, need_bias, _, need_pos = ctx.needs_input_grad
    g = grad.reshape(N * K, D)
    g_dt = g.to(dt)  # what the conv of timm's path receives: the gradient of its output
    gi = gw = gb = gp = None
    if need_weight:
        if ctx.triton:
            cols = torch.ops.effssl_kernels._gather_patches_triton(images, keep, p, dt)
        else:
            cols = torch.ops.effssl_kernels._gather_patches(images, keep, p, dt)
        # explicit sizes: -1 cannot be inferred from an empty batch (N = 0) or C = 0
        gw = torch.mm(g_dt.t(), cols.reshape(N * K, C * p * p)).reshape(ctx.weight_shape)
    if need_bias:
        gb = g_dt.sum(0, dtype=_acc_dtype(dt)).to(dt)
    if need_pos:
        shape, pos_dtype = ctx.pos_meta
        # gather_tokens' pos gradient: each row written once from a fixed-order float32 (float64)
        # sum, so deterministic (index_put's accumulate races on the CPU too); differentiable
        op = (torch.ops.effssl_kernels._gather_tokens_backward_triton if ctx.triton
              else torch.ops.effssl_kernels.gather_tokens_backward)
        gp = op(grad, keep, shape[-2], pos_dtype, pos_dtype, False, True)[1].reshape(shape)
    if need_images and N * C == 0:
        gi = torch.zeros((N, C, H, W), dtype=img_dtype, device=grad.device)  # nothing to scatter
    elif need_images:
        gcols = torch.mm(g_dt, weight.reshape(D, C * p * p)).reshape(N, K, C * p * p)
        if ctx.triton:
            gi = _scatter_patches_torch(gcols, keep, p, H, W, img_dtype)
        else:
            gi = torch.ops.effssl_kernels._scatter_patches(gcols, keep, p, H, W, img_dtype)
    return gi, gw, gb, None, gp


# The gather and the scatter are each other's adjoint, so each one's backward is the other: the
# backward above is differentiable again (double backward, gradgradcheck).
def _setup_gather(ctx, inputs, output):
    images, keep, patch_size, _ = inputs
    ctx.save_for_backward(keep)
    ctx.meta = (patch_size, images.shape[2], images.shape[3], images.dtype)


def _backward_gather(ctx, grad):
    (keep,) = ctx.saved_tensors
    p, H, W, dtype = ctx.meta
    return torch.ops.effssl_kernels._scatter_patches(grad, keep, p, H, W, dtype), None, None, None


def _backward_gather_triton(ctx, grad):
    (keep,) = ctx.saved_tensors
    p, H, W, dtype = ctx.meta
    return _scatter_patches_torch(grad, keep, p, H, W, dtype), None, None, None


def _setup_scatter(ctx, inputs, output):
    cols, keep, patch_size, _, _, _ = inputs
    ctx.save_for_backward(keep)
    ctx.meta = (patch_size, cols.dtype)


def _backward_scatter(ctx, grad):
    (keep,) = ctx.saved_tensors
    p, dtype = ctx.meta
    return torch.ops.effssl_kernels._gather_patches(grad, keep, p, dtype), None, None, None, None, None


if _backend.HAS_EXT:
    torch.library.register_autograd("effssl_kernels::_gather_patches", _backward_gather, setup_context=_setup_gather)
    torch.library.register_autograd("effssl_kernels::_scatter_patches", _backward_scatter, setup_context=_setup_scatter)
    torch.library.register_fake("effssl_kernels::patch_embed_gather")(_fake)
    torch.library.register_fake("effssl_kernels::_gather_patches")(_fake_gather)
    torch.library.register_fake("effssl_kernels::_scatter_patches")(_fake_scatter)
    torch.library.register_autograd("effssl_kernels::patch_embed_gather", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- Triton ops
@torch.library.triton_op("effssl_kernels::_patch_embed_gather_triton", mutates_args=())
def _patch_embed_gather_triton(
    images: Tensor, weight: Tensor, bias: Optional[Tensor], keep: Tensor, pos_embed: Optional[Tensor]
) -> Tensor:
    from ..triton.patch_embed_gather import patch_embed_gather_triton  # lazy: importing triton costs ~2.5 s

    _check(images, weight, bias, keep, pos_embed)
    return patch_embed_gather_triton(images, weight, bias, keep, pos_embed)


@torch.library.triton_op("effssl_kernels::_gather_patches_triton", mutates_args=())
def _gather_patches_triton(images: Tensor, keep: Tensor, patch_size: int, dtype: torch.dtype) -> Tensor:
    from ..triton.patch_embed_gather import gather_patches_triton

    _check_patches("_gather_patches", images, keep, patch_size)
    return gather_patches_triton(images, keep, patch_size, dtype)


_patch_embed_gather_triton.register_autograd(_backward, setup_context=_setup_context_triton)
_gather_patches_triton.register_autograd(_backward_gather_triton, setup_context=_setup_gather)

_backend.register_interpreter_fakes((_patch_embed_gather_triton, _fake), (_gather_patches_triton, _fake_gather))


def _flops(images_shape, weight_shape, bias_shape, keep_shape, pos_shape, out_shape=None):
    """The patch-embedding GEMM of the kept patches: [N * K, C * p * p] x [C * p * p, D]."""
    D, C, ph, pw = weight_shape
    return 2 * keep_shape[0] * keep_shape[1] * D * C * ph * pw


_backend.register_flops([torch.ops.effssl_kernels._patch_embed_gather_triton]
                        + ([torch.ops.effssl_kernels.patch_embed_gather] if _backend.HAS_EXT else []), _flops)
