"""Token keep and patch scaling for timm ``VisionTransformer`` models, without touching ``forward``.

``sparsify_vit(model)`` swaps the classes of ``model`` and ``model.patch_embed`` for subclasses
(as ToMe's ``apply_patch`` does) that override only ``_pos_embed`` and ``PatchEmbed.forward``;
parameters, buffers, ``state_dict`` keys and timm's ``forward``/``forward_features`` are
unchanged. Per call, inside

    with effssl_kernels.token_keep(keep):      # keep: int64 [N, K] over the patch tokens
        out = model(images)

the embedding stage computes only the kept patches in one fused op (``patch_embed_gather``:
patch-embed GEMM + gather + positional embedding) and puts the prefix tokens (cls, registers,
or DeiT's cls and distillation tokens; always kept) first, as timm's ``PatchDropout`` orders
them; everything after ``_pos_embed`` (``patch_drop``, ``norm_pre``, blocks, head) runs
unchanged on ``N x (prefix + K)`` tokens.
``with effssl_kernels.patch_size(model, p):`` runs the same model at another patch size with
PI-resized kernels and an interpolated positional embedding (FlexiViT), differentiably, so
gradients reach the original parameters. Outside both the model is exactly the original.

The keep lives in a ``contextvars.ContextVar``: it is per thread (and per asyncio task) and
applies to every sparsified ViT called inside the ``with``, so an online encoder called inside
and a momentum encoder called outside (or inside ``token_keep(None)``) are driven separately.
``torch.compile(model, fullgraph=True)`` reads it without a graph break (on torch < 2.14,
whose Dynamo cannot trace a ContextVar, through the mirror of ``nn/_state.py``; tested on torch
2.11 and 2.14). The first ``K`` compiles a static graph and a second distinct ``K`` a graph
dynamic in ``K`` that serves every later one (``K = 1`` is one more: Dynamo specialises sizes 0
and 1; ``dynamic=True`` skips the static one); each patch size is a graph of its own. To
``torch.export``, export a wrapper whose ``forward(x, keep)`` enters ``token_keep`` itself: a
keep entered outside the export would become a constant of the program (it raises).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import as_pair
from ..ops._indices import check_keep_range
from ..ops.gather_tokens import _gather_tokens
from ..ops.patch_embed_gather import _patch_embed_gather
from ..patch_scaling import resize_matrix_pinv, resize_patch_embed, resize_pos_embed
from ._state import ContextState, check_recompute, set_patch
from ._swap import sparse_class as _sparse_class

__all__ = ["sparsify_vit", "unsparsify_vit", "token_keep", "patch_size", "is_sparse_vit"]

# (keep [N, K] int64, check values) or None: the keep of the current thread / task.
_KEEP = ContextState("effssl_token_keep", "token_keep")


def _tokenwise_norms() -> tuple[tuple, tuple]:
    """(norm layers that act on each token alone (the last dim), so gathering commutes with
    them; their subclasses that normalise another dim and must not take the fused path)."""
    norms = [nn.LayerNorm]  # timm's LayerNorm and LayerNormFp32 subclass it
    if hasattr(nn, "RMSNorm"):
        norms.append(nn.RMSNorm)
    import timm.layers as tl

    norms += [getattr(tl, n) for n in ("RmsNorm", "RmsNormFp32", "SimpleNorm", "SimpleNormFp32") if hasattr(tl, n)]
    # channels-first (NCHW) variants: they normalise dim 1
    not_tokenwise = [getattr(tl, n) for n in ("LayerNorm2d", "LayerNorm2dFp32", "LayerNormExp2d", "RmsNorm2d",
                                              "RmsNorm2dFp32", "SimpleNorm2d", "SimpleNorm2dFp32") if hasattr(tl, n)]
    return tuple(norms), tuple(not_tokenwise)


# Filled by sparsify_vit (timm is imported there, not when effssl_kernels is imported).
_TOKENWISE_NORMS: tuple = (nn.LayerNorm,)
_NOT_TOKENWISE_NORMS: tuple = ()


# ----------------------------------------------------------------------------- per-call state
@contextlib.contextmanager
def token_keep(keep: Optional[Tensor], *, check: bool = True) -> Iterator[None]:
    """Keep only the patch tokens ``keep`` in every sparsified ViT called inside the ``with``.

    Args:
        keep: int64 (or int32) ``[N, K]``, ``K >= 1``, indices into the ``L`` patch tokens of
            each image (prefix tokens are always kept and come first), on the images' device;
            any order and duplicates are allowed (each index yields its token). ``None``: keep
            all (the untouched model), e.g. for a momentum encoder inside an outer ``with``.
        check: verify ``0 <= keep < L`` once per forward in eager mode (ValueError on CPU; on
            CUDA a device-side assert without a host sync, or a ValueError with
            ``EFFSSL_CHECK_INDICES=1``; skipped under ``torch.compile``). ``False`` skips it (the
            ops are told not to check again either): a bad index then still never reads out of
            bounds (the CPU kernels raise as they read it, CUDA gives NaN rows or torch's
            indexing assert), as inside ``torch.compile``. Shapes, dtype and device are always
            checked.

    Raises TypeError / ValueError here for a wrong type, rank, dtype or ``K == 0``; the model
    raises ValueError for a batch or device mismatch and out-of-range indices.
    """
    if keep is not None:
        if not isinstance(keep, Tensor):
            raise TypeError(f"token_keep: keep must be a tensor or None, got {type(keep).__name__}")
        if keep.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token_keep: keep must be int64 or int32, got {keep.dtype}")
        if keep.dim() != 2:
            raise ValueError(f"token_keep: keep must be 2-D [N, K], got shape {tuple(keep.shape)}")
        if keep.shape[1] == 0:
            raise ValueError("token_keep: keep must keep at least one token per sample (K >= 1)")
        # A copy (as block_mask's): refilling the caller's buffer for the next view before
        # backward must not reach a checkpoint's recomputation of this forward, which would
        # gather other tokens than the forward did (silently wrong gradients until 2026-12-06).
        keep = keep.to(torch.long, copy=True)
    with _KEEP.bound(None if keep is None else (keep, bool(check))):
        yield


def is_sparse_vit(model: nn.Module) -> bool:
    """True when ``model`` was converted by ``sparsify_vit``."""
    return isinstance(model, _SparseViTMixin)


@contextlib.contextmanager
def patch_size(
    model: nn.Module,
    size: Union[int, Sequence[int]],
    *,
    interpolation: str = "bilinear",
    antialias: bool = False,
) -> Iterator[None]:
    """Run a sparsified ViT at patch size ``size`` inside the ``with`` (FlexiViT patch scaling).

    The kernel is PI-resized (``resize_patch_embed``) and the positional embedding of the patch
    grid interpolated (``resize_pos_embed``, bicubic as timm) on every forward from the current
    parameters, so the parameters keep their identity and receive the gradients. The image size
    stays the model's (e.g. 240 px at patch 16, 24, 30 or 40: grids 15, 10, 8, 6); the size must
    divide it. Combines with ``token_keep`` (``keep`` then indexes the new grid; a non-square
    ``(ph, pw)`` embeds all patches, then gathers, since ``patch_embed_gather`` takes square
    patches). The setting belongs to the model (not per thread); nesting restores the outer
    size. The resize matrix is computed and cached here, outside any compiled region.

    Raises TypeError when ``model`` is not sparsified or ``size`` is not an int or a pair of
    ints, ValueError for a non-positive size or one that does not divide the image size.
    """
    if not is_sparse_vit(model):
        raise TypeError("patch_size: call effssl_kernels.sparsify_vit(model) first")
    pe = model.patch_embed
    size = as_pair(size, "patch_size: size")
    fixed = pe.img_size is not None and pe.strict_img_size and not pe.dynamic_img_pad
    if fixed and (pe.img_size[0] % size[0] or pe.img_size[1] % size[1]):
        raise ValueError(f"patch_size: patch {size} does not divide the model's image size {tuple(pe.img_size)}")
    w = pe.proj.weight
    if size != tuple(w.shape[-2:]):
        ct = torch.float64 if w.dtype == torch.float64 else torch.float32
        resize_matrix_pinv(tuple(w.shape[-2:]), size, interpolation=interpolation, antialias=antialias,
                           device=w.device, dtype=ct)  # warm the cache eagerly
    prev = pe.__dict__.get("_effssl_patch")
    set_patch(pe, (size[0], size[1], interpolation, bool(antialias)))
    try:
        yield
    finally:
        set_patch(pe, prev)


# ----------------------------------------------------------------------------- the swapped classes
def _state_of(obj, mixin) -> dict:
    """What pickling ``obj`` would save without ``mixin``'s ``__getstate__`` (Python < 3.11 has no
    ``object.__getstate__``)."""
    getter = getattr(super(mixin, obj), "__getstate__", None)
    return getter() if getter is not None else obj.__dict__


class _SparsePatchEmbedMixin:
    """PatchEmbed that, while a keep or a patch size is set, defers the embedding to ``_pos_embed``
    (which fuses it with the gather and the positional embedding) and returns the images checked
    and padded. Otherwise timm's forward, untouched."""
    _effssl_undo = "unsparsify_vit"  # named by the torch.jit.script refusal (nn/_swap.py)

    _effssl_patch = None  # (ph, pw, interpolation, antialias) while inside patch_size()

    def __getstate__(self):
        # patch_size() is a with-block setting, not state: a copy (an EMA teacher made inside
        # the with, torch.save) starts at the model's own patch size
        state = _state_of(self, _SparsePatchEmbedMixin)
        if "_effssl_patch" in state:
            state = {k: v for k, v in state.items() if k != "_effssl_patch"}
        return state

    def forward(self, x):
        ps = self._effssl_patch
        if _KEEP.get() is None and ps is None:
            return super().forward(x)
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"sparse ViT: images must be [N, C, H, W], got {getattr(x, 'shape', type(x))}")
        H, W = x.shape[-2:]
        p = self.patch_size if ps is None else ps[:2]
        if self.img_size is not None and self.strict_img_size and (H, W) != tuple(self.img_size):
            raise ValueError(f"sparse ViT: input size {H}x{W} does not match the model's {tuple(self.img_size)}")
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (p[1] - W % p[1]) % p[1], 0, (p[0] - H % p[0]) % p[0]))
        elif H % p[0] or W % p[1]:
            raise ValueError(f"sparse ViT: patch size {tuple(p)} must divide the input size {H}x{W}")
        return x


class _SparseViTMixin:
    """VisionTransformer whose ``_pos_embed`` builds ``[prefix, kept patch tokens]`` directly."""
    _effssl_undo = "unsparsify_vit"  # named by the torch.jit.script refusal (nn/_swap.py)

    def __getstate__(self):
        # AccelerationSchedule.apply's forward_features wrapper is a with-block setting (a
        # closure over this model's bound method): a copy (a teacher made inside the with,
        # torch.save) must not run this model's weights through it
        state = _state_of(self, _SparseViTMixin)
        ff = state.get("forward_features")
        if getattr(ff, "_effssl_schedule", False):
            state = {k: v for k, v in state.items() if k != "forward_features"}
        return state

    def forward_intermediates(self, x, *args, **kwargs):
        """timm's, refused for ``output_fmt='NCHW'`` (and so ``get_intermediate_layers(...,
        reshape=True)``) under ``token_keep`` or ``patch_size``: timm reshapes the tokens onto
        the model's own patch grid, which the kept tokens, or another patch size's grid, do not
        fill (it gave garbage channels until 2026-12-06)."""
        if _KEEP.get() is not None or self.patch_embed._effssl_patch is not None:
            try:
                fmt = inspect.signature(super().forward_intermediates).bind(x, *args, **kwargs).arguments.get(
                    "output_fmt", "NCHW")
            except TypeError:
                fmt = None  # let timm report the bad call
            if fmt == "NCHW":
                raise ValueError(
                    "sparse ViT: forward_intermediates with output_fmt='NCHW' (or "
                    "get_intermediate_layers with reshape=True) needs every patch token on the "
                    "model's patch grid, but a token_keep or patch_size is in force: use "
                    "output_fmt='NLC' (the kept tokens, in keep's order; under patch_size "
                    "reshape them to the grid (H // p, W // p) yourself)")
        return super().forward_intermediates(x, *args, **kwargs)

    def _pos_embed(self, x):
        state = _KEEP.get()
        ps = self.patch_embed._effssl_patch
        setting = None if state is None and ps is None else (None if state is None else state[0], ps)
        check_recompute(self, setting, "token_keep or patch_size")
        if state is None and ps is None:
            return super()._pos_embed(x)
        keep, check = (None, False) if state is None else state
        return _sparse_pos_embed(self, x, keep, check, ps)


def _check_keep(keep: Tensor, N: int, L: int, device: torch.device, check: bool) -> None:
    if keep.shape[0] != N:
        raise ValueError(f"token_keep: keep has {keep.shape[0]} rows but the batch has {N} images")
    if keep.device != device:
        raise ValueError(f"token_keep: keep is on {keep.device} but the images are on {device}")
    if check:  # host check on CPU; device-side assert on CUDA (no sync); none under compile
        check_keep_range(keep, L, "token_keep")


# The prefix in timm's order: VisionTransformer puts cls then registers first, DeiT's
# VisionTransformerDistilled cls then dist (it has no dist_token / no registers).
_PREFIX_NAMES = ("cls_token", "dist_token", "reg_token")


def _prefix(model, N: int, who: str = "sparse ViT") -> Optional[Tensor]:
    """``[N, P, D]``: the prefix tokens that timm's ``_pos_embed`` puts first, or None. ``P`` must
    be ``num_prefix_tokens``, which splits ``pos_embed``: a mismatch (e.g. a distilled model
    with registers, which timm's own ``_pos_embed`` ignores) raises instead of broadcasting a
    wrong prefix."""
    tokens = [t.expand(N, -1, -1) for t in (getattr(model, n, None) for n in _PREFIX_NAMES) if t is not None]
    P = sum(t.shape[1] for t in tokens)
    if P != model.num_prefix_tokens:
        raise ValueError(
            f"{who}: the prefix tokens (cls, dist, registers) of {type(model).__name__} hold {P} "
            f"tokens but num_prefix_tokens is {model.num_prefix_tokens}"
        )
    if not tokens:
        return None
    return torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]


def _sparse_pos_embed(model, images: Tensor, keep: Optional[Tensor], check: bool, ps) -> Tensor:
    """prefix tokens (+ their pos) then the kept patch tokens (+ their pos), then ``pos_drop``."""
    N = images.shape[0]
    prefix = _prefix(model, N)  # checks num_prefix_tokens, which splits pos_embed
    pe = model.patch_embed
    # A hook on the projection (old-style weight_norm, spectral_norm and prune recompute its
    # weight in a pre-hook; feature hooks want its output) must run as in timm: the projection
    # is then called on every patch, as timm does, and the kept tokens gathered after it.
    # A projection class with its own forward (torch.ao's QAT Conv2d fake-quantises its weight)
    # counts as hooked: bypassing it for F.conv2d on .weight was silently another model.
    proj_cls = type(pe.proj)
    custom = proj_cls.forward is not nn.Conv2d.forward or proj_cls._conv_forward is not nn.Conv2d._conv_forward
    hooked = custom or bool(pe.proj._forward_pre_hooks or pe.proj._forward_hooks)
    via_proj = hooked and ps is None
    if ps is not None and (custom or pe.proj._forward_hooks):
        raise TypeError(
            "sparse ViT: patch_size resizes patch_embed.proj's kernel and convolves with it directly, "
            f"so it cannot run {'the forward of ' + proj_cls.__name__ if custom else 'forward hooks on the projection'}"
            " (they were skipped silently before 2026-12-06); remove them, or use token_keep alone")
    if hooked and ps is not None:  # patch scaling resizes the weight: the pre-hooks make it
        for hook in list(pe.proj._forward_pre_hooks.values()):
            r = hook(pe.proj, (images,))
            if r is not None:  # a pre-hook may replace the input, as nn.Module.__call__ honours
                images = r[0] if isinstance(r, tuple) else r
    weight, bias = pe.proj.weight, pe.proj.bias
    if ps is None:
        p = tuple(pe.patch_size)
    else:
        p = (ps[0], ps[1])
        weight = resize_patch_embed(weight, p, interpolation=ps[2], antialias=ps[3])
    H, W = images.shape[-2:]
    grid = (H // p[0], W // p[1])
    L = grid[0] * grid[1]
    npre = model.num_prefix_tokens
    pos = model.pos_embed
    pos_prefix = pos_patch = None
    if pos is not None:
        if model.no_embed_class:
            pos_patch = pos
        else:
            pos_prefix, pos_patch = pos[:, :npre], pos[:, npre:]
        old_grid = tuple(pe.grid_size)
        if grid != old_grid:  # patch scaling or dynamic_img_size: as timm, bicubic from the stored grid
            pos_patch = resize_pos_embed(pos_patch, old_grid, grid)
        elif pos_patch.shape[1] != L:
            raise ValueError(f"sparse ViT: pos_embed has {pos_patch.shape[1]} patch entries for {L} patches")
    if keep is not None:
        _check_keep(keep, N, L, images.device, check)

    norm = pe.norm
    tokenwise = isinstance(norm, _TOKENWISE_NORMS) and not isinstance(norm, _NOT_TOKENWISE_NORMS)
    # The range was checked once above (or the caller chose check=False): the ops skip theirs.
    if keep is None:
        x = F.conv2d(images, weight, bias, stride=p).flatten(2).transpose(1, 2)
        x = norm(x)
        if pos_patch is not None:
            x = x + pos_patch
    elif not via_proj and p[0] == p[1] and isinstance(norm, nn.Identity):
        x = _patch_embed_gather(images, weight, bias, keep, pos_patch, check_range=False)
    elif not via_proj and p[0] == p[1] and tokenwise:
        # The norm acts on each token alone, so embed only the kept patches, normalise, then add
        # their positions: still no full embedding.
        x = norm(_patch_embed_gather(images, weight, bias, keep, None, check_range=False))
        if pos_patch is not None:
            x = x + pos_patch.reshape(L, -1)[keep]
    else:
        # A hooked projection, non-square patches (patch_embed_gather takes p x p only) or a norm
        # we cannot prove token-wise: embed every patch, normalise, then gather (+ pos).
        x = pe.proj(images) if via_proj else F.conv2d(images, weight, bias, stride=p)
        x = _gather_tokens(norm(x.flatten(2).transpose(1, 2)), keep, pos_patch, check_range=False)

    if prefix is not None:
        if pos_prefix is not None:
            prefix = prefix + pos_prefix
        x = torch.cat((prefix, x), dim=1)
    if pos is None:
        return x  # timm returns before pos_drop when there is no positional embedding
    return model.pos_drop(x)


def sparsify_vit(model: nn.Module) -> nn.Module:
    """Convert a timm ``VisionTransformer`` in place for ``token_keep`` / ``patch_size``; returns it.

    Supports timm's ``VisionTransformer`` and DeiT's ``VisionTransformerDistilled`` (cls and
    distillation tokens), class token or not (``class_token=False``), register tokens, both
    positional layouts (``no_embed_class``), no positional embedding, ``dynamic_img_size`` /
    ``dynamic_img_pad``, non-square patches (embedded in full, then gathered), a patch-embed
    norm (token-wise norms such as LayerNorm/RMSNorm/timm's SimpleNorm still embed only the kept
    patches, others embed all then gather), ``pos_drop`` and ``patch_drop`` (which then drops
    among the kept tokens in training). Idempotent. ``copy.deepcopy`` keeps
    the conversion (e.g. for a momentum encoder); ``state_dict`` keys are unchanged; the whole module
    pickles (``torch.save(model)``) as the sparse ResNets do (``nn._swap``). Spatial outputs of
    ``forward_intermediates`` need all tokens, as with timm's own PatchDropout.

    Raises TypeError for another model (a subclass that overrides ``_pos_embed`` included) or a
    patch embedding other than timm's ``PatchEmbed``; ValueError when the prefix tokens do not
    add up to ``model.num_prefix_tokens``.
    """
    try:
        from timm.layers import PatchEmbed
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:  # pragma: no cover - timm is an optional dependency
        raise TypeError("sparsify_vit: needs timm (pip install timm)") from e
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"sparsify_vit: expected a timm VisionTransformer, got {type(model).__name__}")
    if is_sparse_vit(model):
        return model
    # The sparse _pos_embed replaces the class's own, so it builds what timm's two versions build;
    # another override (a subclass's own prefix or positions) would be silently dropped: refuse it.
    if type(model)._pos_embed not in (VisionTransformer._pos_embed, VisionTransformerDistilled._pos_embed):
        raise TypeError(
            f"sparsify_vit: {type(model).__name__} overrides VisionTransformer._pos_embed; only timm's "
            "VisionTransformer and VisionTransformerDistilled are supported"
        )
    pe = model.patch_embed
    if not isinstance(pe, PatchEmbed):
        raise TypeError(f"sparsify_vit: patch_embed must be timm's PatchEmbed, got {type(pe).__name__}")
    if type(pe).forward is not PatchEmbed.forward and not isinstance(pe, _SparsePatchEmbedMixin):
        raise TypeError(f"sparsify_vit: {type(pe).__name__} overrides PatchEmbed.forward, which token_keep "
                        "and patch_size would bypass (they embed the kept patches themselves)")
    proj = pe.proj
    if (
        not isinstance(proj, nn.Conv2d)
        or tuple(proj.kernel_size) != tuple(proj.stride)
        or tuple(proj.padding) != (0, 0)
        or tuple(proj.dilation) != (1, 1)
        or proj.groups != 1
        or proj.padding_mode != "zeros"
    ):
        raise TypeError("sparsify_vit: patch_embed.proj must be a Conv2d with kernel == stride, no padding, "
                        "dilation 1, groups 1 (a plain patchify)")
    _prefix(model, 1, "sparsify_vit")  # ValueError now rather than at the first forward
    global _TOKENWISE_NORMS, _NOT_TOKENWISE_NORMS
    _TOKENWISE_NORMS, _NOT_TOKENWISE_NORMS = _tokenwise_norms()
    pe.__class__ = _sparse_class(type(pe), _SparsePatchEmbedMixin)
    model.__class__ = _sparse_class(type(model), _SparseViTMixin)
    return model


def unsparsify_vit(model: nn.Module) -> nn.Module:
    """Undo ``sparsify_vit`` in place (restore timm's classes); returns the model."""
    if not is_sparse_vit(model):
        raise TypeError(f"unsparsify_vit: model was not converted by sparsify_vit ({type(model).__name__})")
    pe = model.patch_embed
    if isinstance(pe, _SparsePatchEmbedMixin):
        set_patch(pe, None)
        pe.__class__ = type(pe)._effssl_base
    model.__dict__.pop("_effssl_setting", None)  # the recompute guard's note (nn/_state.py)
    model.__class__ = type(model)._effssl_base
    return model
