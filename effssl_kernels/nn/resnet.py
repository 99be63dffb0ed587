"""Block-masked (waxing-and-waning) ResNets without touching ``forward``, SEMANTICS.md section 2.

``sparsify(model)`` swaps the classes of the model's ``Conv2d``, ``BatchNorm2d``/``SyncBatchNorm``,
``MaxPool2d``, ``AdaptiveAvgPool2d(1)`` (and timm's ``FastAdaptiveAvgPool``) for subclasses, so
parameters, buffers, ``state_dict`` keys and the model's own ``forward`` are unchanged. Inside

    with effssl_kernels.block_mask(mask):           # a BlockMask, or (keep [N, Hb, Wb], block_size)
        out = model(images)

each swapped module applies section 2 at the cumulative stride ``s`` of its input:
conv -> ``M_out * conv(M_in * x)`` on kept tiles; BN -> batch norm over kept positions with
running-stat and ``num_batches_tracked`` updates as ``nn.BatchNorm2d`` does; max pool ->
``M_out * maxpool(M_in * x)``; global average pool -> mean over each sample's kept positions.
Outside the ``with`` (or inside ``block_mask(None)``) every module runs its original ``forward``:
the converted model is exactly the original.

Layout (``effssl_kernels.sparse.packed``): the first tile-aligned layer packs its input, and from
there every map between layers is a :class:`~effssl_kernels.sparse.packed.PackedMap`, a tensor
subclass that looks like ``[N, C, H, W]`` to the model's code but holds only the kept tiles;
ReLU and residual adds run on the tiles, BN is ``F.batch_norm`` over the tiles (its statistics are
then over kept pixels only), and no map is unpacked until the global pool. The model's own
pointwise ops give what they give on the dense masked map on every path (eager, compiled,
masked-dense): ops that turn zeros into non-zeros (``sigmoid``, ``x + 1``) unpack, and only
converted layers restore removed footprints to zero. One exception: an in-place add of a plain
dense map onto a packed one (``out += t``, the residual of a block whose input ran masked-dense)
takes ``t`` to be zero under removed blocks, as the converted layers' outputs are; add a map
that is not (``out += torch.sigmoid(h)``) out of place (``out = out + t``). A layer that is not
tile-aligned (a stride that does not divide the block, an image that is not a whole number of
blocks) takes the dense map and runs masked-dense. Under ``torch.compile`` maps are not packed
between layers: each layer packs, computes its kept tiles and unpacks (the subclass does not
trace); the tile count is a dynamic size, so new masks do not recompile (except tile counts of
0 and 1, which Dynamo specialises: one more compile each).

Cumulative strides are fixed at ``sparsify`` time by one traced forward of a small dummy input
(eval mode, no grad, so no running statistic moves): every tensor carries the stride of the map it
is on; an op outside the swapped modules passes its input's stride on and must keep the spatial
size and the rank (otherwise the model has a resampling layer or a spatial reduction such as
``x.mean((2, 3))`` that would count removed positions, and ``sparsify`` raises; the global
pool's output is no longer a map, so ``flatten`` and heads after it are free); a
swapped module records its input's stride and multiplies its output's by its own stride. So the
stride is the product of the strides of the layers on the path (residual downsample branches start
from the block input's stride), never a ratio of sizes. ``input_strides(model)`` lists the table.

The mask is read from a ``contextvars.ContextVar`` (per thread / asyncio task) when each module
runs, and the tensors derived from it are saved by autograd, so ``backward`` outside the ``with``
gives the masked gradients. ``torch.utils.checkpoint`` recomputes the forward in ``backward``,
outside the ``with``, so it would recompute unmasked: use :func:`checkpoint` here instead, which
re-enters the mask of the forward for the recomputation. ``mask.keep_ratio()`` gives the removal
ratio to log (1 - keep ratio). ``SyncBatchNorm`` in training takes its statistics over the kept
positions of all ranks: on CUDA packed maps through its own kernels (run on the tiles), elsewhere
(CPU tensors, masked-dense maps) through differentiable all-reduces of the masked sums.
"""
from __future__ import annotations

import contextlib
import contextvars
import operator
import warnings
from collections.abc import Iterator

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .._utils import as_pair, int_arg
from ..masks import BlockMask
from ..reference.masked_net import masked_avg_pool_reference, pool_stride
from ..sparse.masked_dense import masked_batch_norm
from ..sparse.tiles import kept_tiles, prepare_tiles
from ..sparse.packed import (
    PackedMap,
    as_dense,
    batch_norm_map,
    conv2d_map,
    max_pool2d_map,
    packed_avg_pool,
)
from ._spatial_ops import spatial_use
from ._state import ContextState, check_recompute, graph_task_id, patch_restored, patch_snapshot, run_in
from ._swap import sparse_class as _sparse_class

__all__ = ["block_mask", "checkpoint", "input_strides", "is_sparse", "sparsify", "tile_plan",
           "unsparsify"]

Pair = tuple[int, int]


# ----------------------------------------------------------------------------- per-call state
class _KeepSetting(tuple):
    """``(keep, block_size)`` of a keep tensor, compared by value as any setting, with the image
    size of the forward that noted it (``image_size``, not compared)."""

    def __new__(cls, setting: tuple, image_size: tuple[int, int]):
        self = super().__new__(cls, setting)
        self.image_size = image_size
        return self

    def __reduce__(self):  # copy and pickle (a model copied after a checkpointed forward)
        return _KeepSetting, (tuple(self), self.image_size)


class _MaskState:
    """The mask of one ``with block_mask(...)``: a BlockMask, or a keep grid whose image size is
    taken from the input of the model's first masked layer (the first to run in the trace of
    ``sparsify``) at each forward; later layers at stride 1 may see other sizes (a padding-0
    conv, a ceil-mode pool). One BlockMask per image size."""

    __slots__ = ("at_size", "base", "block_size", "by_size", "keep", "last", "mask", "setting")

    def __init__(self, mask: BlockMask | None, keep: Tensor | None, block_size: int | None):
        self.mask, self.keep, self.block_size = mask, keep, block_size
        self.by_size: dict[tuple[int, int], BlockMask] = {}
        self.last: BlockMask | None = None  # the mask of the latest input image
        # The kept list (the step's one host sync) now, not inside a compiled forward.
        self.base = prepare_tiles(mask) if mask is not None else kept_tiles(keep)
        # what identifies this mask for check_recompute (each layer's forward reads it)
        self.setting = ((keep, block_size) if mask is None else
                        (mask.keep, mask.block_size, tuple(mask.image_size)))
        self.at_size: dict[tuple[int, int], _KeepSetting] = {}

    def noted_setting(self, m: BlockMask) -> tuple:
        """What a forward under ``m`` notes for check_recompute: the setting, and for a keep
        tensor its image size too (not compared), which a checkpoint that recomputes a stage
        whose input is dense needs (see :meth:`get`)."""
        if self.mask is not None:
            return self.setting
        size = tuple(m.image_size)
        s = self.at_size.get(size)
        if s is None:
            s = self.at_size[size] = _KeepSetting(self.setting, size)
        return s

    def _mask_of(self, size: Pair) -> BlockMask:
        """A new BlockMask of this step's keep for images of ``size`` (the constructor checks
        the grid), sharing the kept list prepared on entry."""
        if self.mask is None:
            m = BlockMask(self.keep, self.block_size, size)
        else:
            m = BlockMask(self.mask.keep, self.mask.block_size, size)
        prepare_tiles(m, self.base)
        return m

    def get(self, x: Tensor, in_stride: Pair, fn: str, first: bool = False,
            recomputed_size: tuple[int, int] | None = None) -> BlockMask:
        tracing = torch.compiler.is_compiling()
        if self.mask is not None:
            size = tuple(self.mask.image_size)
            if first and (int(x.shape[-2]), int(x.shape[-1])) != size:
                raise ValueError(f"{fn}: the input image is {x.shape[-2]}x{x.shape[-1]} but the "
                                 f"BlockMask's image is {size[0]}x{size[1]}")
            if not tracing:
                return self.mask
            # In a trace: a copy made in it, whose caches (tile tables, pixel masks) the
            # forward's layers share without Dynamo guarding on them (BlockMask._caches)
            if first or self.last is None:
                self.last = self._mask_of(size)
            return self.last
        # The input image (the first layer's input; or any stride-1 input before any first
        # layer ran, e.g. a submodule called on its own) fixes the block grid.
        if recomputed_size is not None and not first:
            # A checkpoint's recomputation: the image size this module's forward ran at, noted
            # per checkpoint (check_recompute has compared the keep by value), not the last
            # image's (a later view of another size under the same keep) nor none (a stage
            # recomputed first under the `with` of an equal keep)
            size = recomputed_size
        elif first or (self.last is None and in_stride == (1, 1)):
            size = (int(x.shape[-2]), int(x.shape[-1]))
        elif self.last is None and isinstance(x, PackedMap) and x.mask.block_size == self.block_size:
            # A later stage run first with no note (torch <= 2.7 knows no checkpoint): its input
            # map carries the image size
            size = tuple(x.mask.image_size)
        else:
            size = None
        if size is not None:
            # not cached in a trace (Dynamo would guard on the dict: see BlockMask._caches)
            m = None if tracing else self.by_size.get(size)
            if m is None:
                m = self._mask_of(size)
                if not tracing:
                    self.by_size[size] = m
            self.last = m
            return m
        m = self.last
        if m is None:
            raise ValueError(f"{fn}: block_mask(keep, block_size) takes the image size from the "
                             f"first masked layer, which must see the input image (stride 1); "
                             f"pass a BlockMask instead")
        return m


_MASK = ContextState("effssl_block_mask", "block_mask")


@contextlib.contextmanager
def block_mask(mask: BlockMask | Tensor | None, block_size: int | None = None) -> Iterator[None]:
    """Run every sparsified ResNet called inside the ``with`` with these kept blocks.

    Args:
        mask: a :class:`BlockMask`; or a bool ``[N, Hb, Wb]`` keep grid (True = kept) with
            ``block_size``, the image size then being the spatial size of the input of the
            first masked layer; or None: no mask (the untouched model), e.g. for a momentum
            encoder called inside an outer ``with``.
        block_size: the block side in input pixels, with a keep tensor (positive int); with a
            BlockMask it must be None or equal to ``mask.block_size``.

    Raises TypeError / ValueError here for a wrong type, dtype, rank or block size; the model
    raises ValueError for a batch, grid, size or device mismatch.
    """
    keep = mask.keep if isinstance(mask, BlockMask) else mask
    if isinstance(keep, Tensor) and keep.device.type == "meta":
        # the tile lists are built from its values now, which a meta tensor does not have
        raise ValueError("block_mask: the keep grid is on the meta device (no values); give it on the "
                         "model's device")
    if mask is None:
        state = None
    elif isinstance(mask, BlockMask):
        if block_size is not None and block_size != mask.block_size:
            raise ValueError(f"block_mask: block_size {block_size} differs from the BlockMask's "
                             f"{mask.block_size}")
        state = _MaskState(mask, None, None)
    elif isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"block_mask: keep must be a bool tensor (True = kept), got {mask.dtype}")
        if mask.dim() != 3:
            raise ValueError(f"block_mask: keep must be [N, Hb, Wb], got shape {tuple(mask.shape)}")
        if block_size is None:
            raise ValueError("block_mask: a keep tensor needs block_size")
        if isinstance(block_size, (bool, float)):
            raise TypeError(f"block_mask: block_size must be an int, got {block_size!r}")
        B = operator.index(block_size)
        if B <= 0:
            raise ValueError(f"block_mask: block_size must be positive, got {B}")
        state = _MaskState(None, mask.clone(), B)
    else:
        raise TypeError(f"block_mask: expected a BlockMask, a bool keep tensor or None, got "
                        f"{type(mask).__name__}")
    with _MASK.bound(state):
        yield


def checkpoint(function, *args, **kwargs):
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)`` that
    recomputes under the :func:`block_mask`, :func:`~effssl_kernels.token_keep` and
    :func:`~effssl_kernels.patch_size` in force now
    (plain checkpointing would recompute unmasked, or with every token, when ``backward`` runs
    outside the ``with``). As with any checkpoint, a BatchNorm in training inside ``function``
    updates its running statistics again when recomputed.

    ``use_reentrant=True`` works for ViTs; a packed map of a sparsified ResNet going in or out
    raises ValueError (reentrant autograd would take the tiles' shape for the dense one).

    Inside ``torch.compile`` it is ``torch.utils.checkpoint`` (traced, recomputed in the graph's
    backward, with the forward's tensors), except under a :func:`block_mask`: there it is a plain
    call, saving no memory by itself (Dynamo cannot trace a checkpoint of masked ResNet layers,
    which fill the mask's caches); ``torch._functorch.config.activation_memory_budget`` makes
    the compiled graph recompute instead."""
    kwargs.setdefault("use_reentrant", False)
    if torch.compiler.is_compiling():
        if _MASK.get() is None:
            return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)
        return function(*args, **{k: v for k, v in kwargs.items() if k not in _CHECKPOINT_ONLY})
    # Both are context variables: a snapshot of the context carries them (and any later one).
    snapshot = contextvars.copy_context()
    patches = patch_snapshot()  # ek.patch_size settings: on the models, not in the context
    reentrant = bool(kwargs["use_reentrant"])
    # The mask state is shared by every call in the `with`: its image (`last`, for a keep tensor)
    # may be another view's by backward, so the recomputation runs with the one of this call.
    state = _MASK.get()
    last = state.last if state is not None else None

    def run(*a, **k):
        if reentrant:
            _refuse_packed(a, k)
        recompute = state is not None and graph_task_id() != -1
        if recompute:
            now, state.last = state.last, last
        try:
            with patch_restored(patches):
                out = run_in(snapshot, function, *a, **k)
        finally:
            if recompute:
                state.last = now
        if reentrant:
            _refuse_packed(out)
        return out

    return torch.utils.checkpoint.checkpoint(run, *args, **kwargs)


# torch.utils.checkpoint's own keyword arguments, not the function's
_CHECKPOINT_ONLY = ("use_reentrant", "context_fn", "determinism_check", "debug", "preserve_rng_state",
                    "early_stop", "respect_saved_tensors_hooks")


def _refuse_packed(*trees) -> None:
    if any(isinstance(t, PackedMap) for t in tree_flatten(trees)[0]):
        raise ValueError("masked_checkpoint: use_reentrant=True cannot carry the packed maps of a "
                         "sparsified ResNet in or out of the checkpointed function; use the default "
                         "use_reentrant=False")


def _in_stride(module: nn.Module) -> Pair:
    s = module.__dict__.get("_effssl_in_stride")
    if s is None:
        name = module.__dict__.get("_effssl_name", "?")
        raise ValueError(f"sparse ResNet: {name} ({type(module).__name__}) did not run in the forward "
                         f"traced by sparsify (in eval mode), so its input stride is unknown; call "
                         f"sparsify(model, example_input=...) again with an input that runs it (a "
                         f"branch that runs only in training, like GoogLeNet's aux heads, cannot be "
                         f"traced: remove it)")
    return s


def _mask_for(module: nn.Module, x: Tensor) -> tuple[BlockMask | None, Pair]:
    state = _MASK.get()
    if state is None:
        check_recompute(module, None, "block_mask")
        return None, (1, 1)
    s = _in_stride(module)
    fn = f"sparse {type(module)._effssl_base.__name__}"
    first = module.__dict__.get("_effssl_first", False)
    if state.mask is None and not torch.compiler.is_compiling() and graph_task_id() == -1:
        # a keep tensor's eager forward: the mask first, so the note carries its image size
        m = state.get(x, s, fn, first=first)
        check_recompute(module, state.noted_setting(m), "block_mask")
    else:
        noted = check_recompute(module, state.setting, "block_mask")
        m = state.get(x, s, fn, first=first, recomputed_size=getattr(noted, "image_size", None))
    m.check_input(x, fn)
    return m, s


# ----------------------------------------------------------------------------- swapped classes
# Maps stay packed (PackedMap) from the first tile-aligned layer on; layers that are not
# tile-aligned take the dense map and run masked-dense (sparse.packed has the rules).
class _MaskedConv2d:
    def forward(self, x):
        mask, s = _mask_for(self, x)
        if mask is None:
            return super().forward(as_dense(x))
        return conv2d_map(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                          self.groups, mask=mask, in_stride=s)


class _MaskedBatchNorm:
    """BatchNorm2d / SyncBatchNorm over kept positions (SyncBatchNorm: of all ranks)."""

    def forward(self, x):
        mask, s = _mask_for(self, x)
        if mask is None:
            return super().forward(as_dense(x))
        if x.dim() != 4:
            raise ValueError(f"sparse BatchNorm2d: expected 4-D input, got {x.dim()}-D")
        group = _sync_group(self)
        if group is not None and isinstance(x, PackedMap) and x.device.type == "cuda":
            # A [T, C, bh, bw] batch holds exactly the kept pixels, so nn.SyncBatchNorm's own
            # cross-rank kernels (counts included) compute section 2's SyncBN as is.
            return PackedMap.from_tiles(super().forward(x.tiles), x.index, x.mask)
        # As nn.BatchNorm2d.forward: the update factor and num_batches_tracked.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        rm = self.running_mean if use_running else None
        rv = self.running_var if use_running else None
        # SyncBatchNorm on CPU tensors or masked-dense maps: sums all-reduced across ranks.
        reduce = None if group is None else _cross_rank_sum(group)
        if isinstance(x, PackedMap):
            return batch_norm_map(x, rm, rv, self.weight, self.bias, bn_training, factor,
                                  self.eps, reduce=reduce)
        return masked_batch_norm(x, mask.pixel_mask(s, x.shape[-2:]), rm, rv, self.weight,
                                 self.bias, bn_training, factor, self.eps, reduce=reduce)


def _sync_group(bn: nn.Module):
    """The process group a SyncBatchNorm in training reduces over, or None (BatchNorm2d, eval,
    no initialised process group of more than one rank)."""
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training):
        return None
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _cross_rank_sum(group):
    # eager and compiled alike: torch.distributed.nn's differentiable all_reduce does not trace
    # and is deprecated (FutureWarning from torch 2.14) in favour of the functional collectives
    return lambda t: _AllReduceSum.apply(t, group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group`` through the functional collective (traceable by
    torch.compile); the gradient is the same sum of the gradients."""

    @staticmethod
    def forward(ctx, t, group):
        from torch.distributed._functional_collectives import all_reduce

        ctx.group = group
        return all_reduce(t, "sum", group)

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed._functional_collectives import all_reduce

        return all_reduce(grad.contiguous(), "sum", ctx.group), None


class _MaskedMaxPool2d:
    def forward(self, x):
        mask, s = _mask_for(self, x)
        if mask is None:
            return super().forward(as_dense(x))
        return max_pool2d_map(x, self.kernel_size, self.stride, self.padding, self.dilation,
                              self.ceil_mode, mask=mask, in_stride=s)


def _masked_global_mean(x, mask, s):
    """``[N, C]`` mean over each sample's kept positions."""
    if isinstance(x, PackedMap):
        return packed_avg_pool(x)
    return masked_avg_pool_reference(x, mask.pixel_mask(s, x.shape[-2:]))


class _MaskedAdaptiveAvgPool2d:
    """``AdaptiveAvgPool2d(1)``: ``[N, C, 1, 1]`` mean over each sample's kept positions."""

    def forward(self, x):
        mask, s = _mask_for(self, x)
        if mask is None:
            return super().forward(as_dense(x))
        return _masked_global_mean(x, mask, s).view(x.shape[0], x.shape[1], 1, 1)


class _MaskedFastAdaptiveAvgPool:
    """timm ``FastAdaptiveAvgPool`` (NCHW): ``[N, C]`` or ``[N, C, 1, 1]``."""

    def forward(self, x):
        mask, s = _mask_for(self, x)
        if mask is None:
            return super().forward(as_dense(x))
        y = _masked_global_mean(x, mask, s)
        return y if self.flatten else y.view(x.shape[0], x.shape[1], 1, 1)


_MIXINS = (_MaskedConv2d, _MaskedBatchNorm, _MaskedMaxPool2d, _MaskedAdaptiveAvgPool2d,
           _MaskedFastAdaptiveAvgPool)


def _is_swapped(m: nn.Module) -> bool:
    return isinstance(m, _MIXINS)


def is_sparse(model: nn.Module) -> bool:
    """True when ``model`` holds modules converted by :func:`sparsify`."""
    return any(_is_swapped(m) for m in model.modules())


# ----------------------------------------------------------------------------- conversion plan
def _fast_avg_pool_cls():
    try:
        from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
        return FastAdaptiveAvgPool
    except ImportError:  # pragma: no cover - timm is optional
        return None


# Layers that resample or mix positions in a way section 2 does not define: refused.
_UNSUPPORTED = (nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.FractionalMaxPool2d,
                nn.ConvTranspose2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
                nn.PixelShuffle, nn.PixelUnshuffle, nn.Unfold, nn.Fold, nn.InstanceNorm2d,
                nn.GroupNorm, nn.LocalResponseNorm)


def _plan(model: nn.Module) -> dict[nn.Module, type]:
    """module -> mixin for every module to swap; TypeError for what we cannot mask."""
    fast = _fast_avg_pool_cls()
    plan: dict[nn.Module, type] = {}
    for name, m in model.named_modules():
        if _is_swapped(m):  # converted by an earlier sparsify
            continue
        where = f"sparsify: {name or 'model'} ({type(m).__name__})"
        t = type(m)
        if parametrize.is_parametrized(m) and len(t.__bases__) == 1:
            t = t.__bases__[0]  # torch's Parametrized<cls>: properties over cls, no forward of its own
        if t is nn.Conv2d:
            if m.padding_mode != "zeros":
                raise ValueError(f"{where}: padding_mode {m.padding_mode!r} is not supported "
                                 f"(only 'zeros': removed blocks read as zeros)")
            plan[m] = _MaskedConv2d
        elif t in (nn.BatchNorm2d, nn.SyncBatchNorm):
            plan[m] = _MaskedBatchNorm
        elif t is nn.MaxPool2d:
            if m.return_indices:
                raise TypeError(f"{where}: return_indices=True is not supported")
            plan[m] = _MaskedMaxPool2d
        elif t is nn.AdaptiveAvgPool2d:
            if m.output_size not in (1, (1, 1), [1, 1]):
                raise TypeError(f"{where}: only global pooling (output_size 1) is supported, got "
                                f"{m.output_size}")
            plan[m] = _MaskedAdaptiveAvgPool2d
        elif fast is not None and t is fast:
            if tuple(m.dim) != (2, 3):
                raise TypeError(f"{where}: only NCHW input is supported")
            plan[m] = _MaskedFastAdaptiveAvgPool
        elif isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)
                        + _UNSUPPORTED):  # BatchNorm1d of a projector head after the pool is fine
            raise TypeError(f"{where}: not supported by the masked network (a subclass with its own "
                            f"forward, or a layer section 2 does not define)")
    return plan


def _module_stride(m: nn.Module) -> Pair:
    if isinstance(m, nn.Conv2d):
        return tuple(m.stride)
    if isinstance(m, nn.MaxPool2d):
        st = pool_stride(m.kernel_size, m.stride)
        st = (st, st) if isinstance(st, int) else tuple(st)
        return st
    return (1, 1)


class _StrideTracer(TorchFunctionMode):
    """Carries the cumulative stride of each tensor (``_effssl_s``) through a forward."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 inside a swapped module (whose hooks set the output stride)
        self.error: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.error is not None:
            return out
        ins = [t for t in tree_flatten((args, kwargs or {}))[0]
               if isinstance(t, Tensor) and getattr(t, "_effssl_s", None) is not None]
        if not ins:
            return out
        strides = {t._effssl_s for t in ins}
        if len(strides) > 1 and self.depth == 0:
            self.error = (f"{getattr(func, '__name__', func)} combines maps of strides "
                          f"{sorted(strides)}")
            return out
        s = ins[0]._effssl_s
        first = args[0] if args else (kwargs or {}).get("input")
        if self.depth == 0 and first is ins[0] and ins[0].dim() == 4:
            why = spatial_use(func, args, kwargs or {})
            if why is not None:
                self.error = why
                return out
        for o in tree_flatten(out)[0]:
            if not isinstance(o, Tensor) or o is ins[0]:
                continue
            if self.depth == 0 and o.dim() == 4 and ins[0].dim() == 4 and o.shape[-2:] != ins[0].shape[-2:]:
                self.error = (f"{getattr(func, '__name__', func)} changes the spatial size "
                              f"{tuple(ins[0].shape[-2:])} -> {tuple(o.shape[-2:])} outside the "
                              f"supported layers")
                return out
            if self.depth == 0 and o.dim() != 4 and ins[0].dim() == 4:
                # A reduction (x.mean((2, 3)), x.flatten(2).sum(-1), ...) or a reshape of a
                # feature map: under a mask it would count removed positions as zeros.
                self.error = (f"{getattr(func, '__name__', func)} turns a "
                              f"{tuple(ins[0].shape)} feature map into a {o.dim()}-D tensor "
                              f"outside the supported layers, which would count removed "
                              f"positions as zeros under a mask; use nn.AdaptiveAvgPool2d(1) "
                              f"(mean over kept positions) for global average pooling")
                return out
            o._effssl_s = s
        return out


def _trace_strides(model: nn.Module, modules: list[nn.Module], example_input: Tensor | None
                   ) -> tuple[dict[nn.Module, Pair], nn.Module | None]:
    """({module: input stride} of the swapped ``modules`` that ran, the first of them to run)."""
    if example_input is not None:
        return _trace_once(model, modules, example_input)
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    if not convs:
        raise TypeError("sparsify: the model has no Conv2d")
    # The first conv registered need not be the first to run (a head registered first): try
    # each distinct in_channels in registration order.
    first_error = None
    for c in dict.fromkeys(m.in_channels for m in convs):
        p = convs[0].weight
        x = torch.zeros(2, c, 64, 64, device=p.device, dtype=p.dtype)
        try:
            return _trace_once(model, modules, x)
        except RuntimeError as e:  # the model's own forward rejected the input
            first_error = first_error or e
    raise TypeError("sparsify: the default example input [2, C, 64, 64] (C the in_channels of "
                    "a Conv2d) does not run the model; pass example_input") from first_error


def _trace_once(model: nn.Module, modules: list[nn.Module], example_input: Tensor
                ) -> tuple[dict[nn.Module, Pair], nn.Module | None]:
    table: dict[nn.Module, Pair] = {}
    order: list[nn.Module] = []
    tracer = _StrideTracer()
    handles = []
    names = {m: n for n, m in model.named_modules()}
    fast = _fast_avg_pool_cls()
    pools = (nn.AdaptiveAvgPool2d,) + ((fast,) if fast is not None else ())

    def pre(m, args):
        x = args[0] if args else None
        s = getattr(x, "_effssl_s", None) if isinstance(x, Tensor) else None
        if s is None:
            tracer.error = tracer.error or (
                f"the input of {names.get(m, '?')} ({type(m).__name__}) is not a feature map of "
                f"the image (a global pool's output, as in a squeeze-and-excitation block, or "
                f"a tensor made inside forward), which a mask cannot follow")
        elif m not in table:
            order.append(m)
            table[m] = s
        elif table[m] != s:
            tracer.error = tracer.error or (f"{type(m).__name__} runs at strides {table[m]} and {s} "
                                            f"(a shared module must see one stride)")
        tracer.depth += 1

    def post(m, args, out):
        tracer.depth -= 1
        s = table.get(m)
        if s is not None and isinstance(out, Tensor):
            if isinstance(m, pools):
                out._effssl_s = None  # pooled: no longer a map (flatten and heads are fine)
                return
            ms = _module_stride(m)
            out._effssl_s = (s[0] * ms[0], s[1] * ms[1])

    for m in modules:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    modes = {m: m.training for m in model.modules()}
    x = example_input.detach().clone()
    x._effssl_s = (1, 1)
    try:
        model.eval()
        with _MASK.bound(None), torch.no_grad(), tracer:  # converted modules run unmasked in the trace
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    if tracer.error is not None:
        raise TypeError(f"sparsify: cannot track the cumulative stride: {tracer.error}")
    return table, (order[0] if order else None)


def sparsify(model: nn.Module, example_input: Tensor | None = None) -> nn.Module:
    """Convert a ResNet (torchvision or timm; any model built of the supported layers) in place
    for :func:`block_mask`; returns it. Run it after any module replacement (e.g.
    ``nn.SyncBatchNorm.convert_sync_batchnorm``, a new head): called again, it converts the
    modules still unconverted and traces the strides again; a fully converted model is returned
    as is. (An unconverted layer that gets a packed map raises at forward; on a masked-dense
    map it cannot be detected and would run unmasked.)

    ``example_input`` is the dummy input of the stride trace (default zeros ``[2, C, 64, 64]``
    on the first conv's device and dtype); it must run every swapped module. No running statistic
    changes. Raises TypeError for layers the masked network does not define (e.g. ``AvgPool2d``
    downsampling, ``Conv2d``/``BatchNorm2d`` subclasses with their own forward, non-global or
    max pools, a spatial reduction such as ``x.mean((2, 3))`` outside ``AdaptiveAvgPool2d(1)``)
    and ValueError for a ``padding_mode`` other than ``'zeros'``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify: expected an nn.Module, got {type(model).__name__}")
    plan = _plan(model)  # the modules still unconverted
    done = [m for m in model.modules() if _is_swapped(m)]
    if not plan and done and example_input is None:
        return model
    table, first = _trace_strides(model, list(plan) + done, example_input)
    for m, mixin in plan.items():
        m.__class__ = _sparse_class(type(m), mixin)
    names = {m: n for n, m in model.named_modules()}
    untraced = []
    for m in list(plan) + done:
        m.__dict__.pop("_effssl_first", None)
        if m in table:
            m._effssl_in_stride = table[m]
            m.__dict__.pop("_effssl_name", None)
        elif "_effssl_in_stride" not in m.__dict__:
            m._effssl_name = names.get(m, "?")  # for the error if it ever runs under a mask
            untraced.append(m._effssl_name)
    if untraced:
        warnings.warn(
            f"sparsify: {len(untraced)} converted module(s) did not run in the stride trace "
            f"(eval mode, example_input {'given' if example_input is not None else 'default'}): "
            f"{', '.join(untraced[:5])}{', ...' if len(untraced) > 5 else ''}; they raise if they run "
            f"under a mask. A branch that runs only in training (e.g. GoogLeNet's aux heads) is "
            f"never traced: remove it, or pass an example_input that runs the others", stacklevel=2)
    if first is not None:
        first._effssl_first = True  # its input fixes the image size of block_mask(keep, B)
    if not any(h is _check_converted for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_check_converted)
    return model


def _check_converted(model: nn.Module, args) -> None:
    """Forward pre-hook of a model :func:`sparsify` converted: under a mask, every layer it would
    convert must be converted. A layer replaced afterwards (``convert_sync_batchnorm``, a new
    head) and never converted fails loudly on a packed map, but on a masked-dense map it would
    run unmasked, silently (its BatchNorm counting removed zeros). One module walk (~0.3 ms on a
    ResNet-50) per masked forward; skipped in a compiled trace."""
    if torch.compiler.is_compiling() or _MASK.get() is None:
        return
    missed = _plan(model)
    if missed:
        names = {m: n for n, m in model.named_modules()}
        listed = ", ".join(f"{names.get(m, '?')} ({type(m).__name__})" for m in list(missed)[:5])
        raise RuntimeError(
            f"sparsify: {len(missed)} layer(s) were added or replaced after sparsify and are not "
            f"converted: {listed}{', ...' if len(missed) > 5 else ''}; under a mask they would run "
            f"unmasked. Call ek.sparsify(model) again after replacing modules (e.g. after "
            f"nn.SyncBatchNorm.convert_sync_batchnorm)")


def unsparsify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify` in place (restore the original classes); returns the model."""
    if not is_sparse(model):
        hint = ("; a model converted by sparsify_vit is undone by ek.unsparsify_vit"
                if any(getattr(type(m), "_effssl_undo", None) == "unsparsify_vit" for m in model.modules())
                else "")
        raise TypeError(f"unsparsify: model was not converted by sparsify ({type(model).__name__}){hint}")
    for key in [k for k, h in model._forward_pre_hooks.items() if h is _check_converted]:
        del model._forward_pre_hooks[key]
    for m in model.modules():
        if _is_swapped(m):
            for k in ("_effssl_in_stride", "_effssl_first", "_effssl_name", "_effssl_setting"):
                m.__dict__.pop(k, None)
            m.__class__ = _unswapped_class(type(m))
    return model


def _unswapped_class(cls: type) -> type:
    """The class a swapped module had before :func:`sparsify`: the sparse class's base; for a
    class made over the sparse one afterwards (torch's parametrize, e.g. weight_norm after
    sparsify), the same class over that base, so the parametrization stays."""
    if "_effssl_base" in cls.__dict__:
        return cls._effssl_base
    sparse = next(c for c in cls.__mro__ if "_effssl_base" in c.__dict__)
    if cls.__bases__ != (sparse,):
        raise TypeError(f"unsparsify: cannot restore {cls.__name__}, a class made over the sparse "
                        f"{sparse.__name__} with other bases too")
    ns = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    base = sparse._effssl_base
    return type(cls.__name__.replace(sparse.__name__, base.__name__), (base,), ns)


def tile_plan(model: nn.Module, block_size: int, image_size) -> dict[str, str]:
    """``{module name: 'tiles' | 'masked-dense'}`` for every swapped module of a sparsified
    model on images of ``image_size`` with blocks of ``block_size``: which layers compute kept
    tiles only and which fall back to masked-dense (a stride that does not divide the block, an
    image that is not a whole number of blocks, a ceil-mode pool, an input that is not
    image / stride, as after a padding-0 conv; BatchNorm and the global pool after a layer or an
    op that gave a dense map, such as an out-of-place add of a packed and a dense map).

    Observed, not predicted: one forward of a zero image ``[1, C, H, W]`` in eval mode without
    gradients, under a checkerboard mask, records which modules returned (the global pool: got)
    a packed map. Running statistics do not change; ops that leave the tiles warn as in
    training. Raises TypeError for a model :func:`sparsify` did not convert."""
    if not is_sparse(model):
        raise TypeError("tile_plan: model was not converted by sparsify")
    H, W = as_pair(image_size, "tile_plan: image_size")
    B = int_arg("block_size", "tile_plan", block_size, 1)
    grid = torch.arange(H // B).view(-1, 1) + torch.arange(W // B)
    swapped = {m: name for name, m in model.named_modules()
               if _is_swapped(m) and "_effssl_in_stride" in m.__dict__}
    first = next((m for m in swapped if m.__dict__.get("_effssl_first")), next(iter(swapped)))
    p = next(first.parameters(), None)
    p = next(model.parameters()) if p is None else p
    C = first.in_channels if isinstance(first, nn.Conv2d) else getattr(first, "num_features", None)
    if C is None:
        raise TypeError(f"tile_plan: cannot tell the input channels from {type(first).__name__}")
    mask = BlockMask((grid % 2 == 0).unsqueeze(0).to(p.device), B, (H, W))
    fast = _fast_avg_pool_cls()
    pools = (nn.AdaptiveAvgPool2d,) + ((fast,) if fast is not None else ())
    packed: dict[nn.Module, bool] = {}

    def hook(m, args, out):
        x = args[0] if isinstance(m, pools) else out
        packed[m] = packed.get(m, True) and isinstance(x, PackedMap)

    handles = [m.register_forward_hook(hook) for m in swapped]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), block_mask(mask):
            model(torch.zeros(1, C, H, W, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return {name: "tiles" if packed.get(m) else "masked-dense" for m, name in swapped.items()}


def input_strides(model: nn.Module) -> dict[str, Pair]:
    """``{module name: cumulative stride (sh, sw) of its input}`` of a sparsified model."""
    return {name: m.__dict__["_effssl_in_stride"] for name, m in model.named_modules()
            if _is_swapped(m) and "_effssl_in_stride" in m.__dict__}
