"""PackedMap: a masked feature map that stays packed (kept tiles only) between layers.

A sparsified ResNet (``effssl_kernels.sparsify``) never changes the model's ``forward``, so the
tensors that flow between its layers must look like ``[N, C, H, W]`` maps to the model's own code
(ReLU, residual adds, ``x.shape``) while holding only the kept tiles. :class:`PackedMap` is that
tensor: a ``torch.Tensor`` subclass whose storage *is* the packed ``[T, C, bh, bw]`` tiles of
:func:`~effssl_kernels.sparse.tiles.pack`, with the :class:`TileIndex` of its resolution attached.

* The swapped conv / BN / pool modules read ``.tiles`` and return PackedMaps, so from the first
  tile-aligned layer to the global pool no activation is ever unpacked (SegBlocks' layout).
* Elementwise ops run on the tiles directly where that gives exactly the dense op's result on
  the dense map (zeros under removed blocks): ops that map zeros to zeros, with every other
  operand zero there too. ReLU and friends, tanh, residual adds of maps, scaling by a scalar, a
  per-channel tensor or a per-sample ``[N, 1, 1, 1]`` one such as drop-path's, adding zero.
  Ops that turn zeros into non-zeros (``sigmoid``, ``x + 1``, ``1 - x``, ``clamp(min=0.5)``, adding
  a bias) run on the dense map and return it dense, as the per-layer path under
  ``torch.compile`` and the masked-dense reference do: section 2 restores removed footprints to
  zero at every *layer*, and every converted layer reads its input masked, so only consumers
  that are not layers (sums, heads) can see the difference, and they see the same values on
  every path.
* A plain tensor of the map's full dense shape (a masked-dense layer's output, say) is packed for
  products (exact whenever it is finite under removed blocks: there the dense map's
  ``0 * inf`` would be NaN, the packed product has no such position) and for in-place sums such as
  ``out += identity`` (exact when it is zero there, as every converted layer's output is; a
  packed map cannot hold anything else). Out-of-place sums with it run on the dense map.
* Scalars are not checked for finiteness: ``x * inf``, ``x / 0`` keep removed positions zero
  where the dense op gives NaN (section 2: elementwise ops keep zeros at zero).
* ``shape``, ``size()``, ``dim()``, ``numel()`` report the dense ``[N, C, H, W]``, ``stride()``
  and ``is_contiguous()`` the layout of the dense map that ops off the tiles see (contiguous,
  whatever the tiles' layout); ``dtype``, ``device``, ``requires_grad``, ``grad_fn`` are the
  tiles'. Gradient hooks (``register_hook``, ``register_post_accumulate_grad_hook`` of a leaf
  map), ``retain_grad``, ``.grad`` and a map among the ``inputs`` of ``torch.autograd.grad`` /
  ``backward`` work on the tiles and hand out PackedMaps;
  a map among the outputs takes a packed or a dense gradient. In-place ops that run on the tiles
  return the map itself. ``.data`` and ``.numpy()`` are dense copies of their own.
* The layer functionals (``F.conv2d``, ``F.batch_norm``, pools, norms, resampling) raise: a
  PackedMap reaching one means a module that ``sparsify`` did not convert (added or replaced
  after it) would run unmasked.
* Any other op sees the dense map (:meth:`PackedMap.to_dense`, zeros under removed blocks) and
  returns a dense result, with one warning per op name; an in-place one raises, since it
  would modify a temporary. Views (``x[:, :k]``, ``x.view(...)``) are views of that temporary:
  an in-place change through one does not reach the map (and is never served back to it).

Autograd runs on the tiles (the subclass is a plain alias of them), so gradients are packed too.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..masks import BlockMask, _positive_pair
from ..reference.masked_net import masked_batch_norm_reference, masked_max_pool2d_reference, pool_stride
from .conv import _check_weight, _check_x, _conv_tiles, conv_tile_halo, sparse_conv2d
from .halo_ops import halo_max_pool2d
from .tiles import TileIndex, pack, unpack

_DisableSubclass = torch._C.DisableTorchFunctionSubclass

# Ops applied pixel by pixel (and channel by channel) that run on the tiles when that gives
# exactly the dense op on the dense map, i.e. when removed positions stay zero (module docstring):
# by kind, as that depends on the other operands.
_UNARY = {  # zero to zero whatever their other (non-tensor) arguments
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.hardswish, F.mish, F.dropout,
    F.selu, F.celu, F.softsign, F.tanhshrink, F.softshrink, F.hardshrink,
    torch.relu, torch.relu_, torch.tanh, torch.neg,
    Tensor.relu, Tensor.relu_, Tensor.tanh, Tensor.tanh_, Tensor.neg, Tensor.__neg__,
    Tensor.clone, Tensor.contiguous, Tensor.detach, Tensor.float, Tensor.half, Tensor.bfloat16,
    Tensor.double, Tensor.type_as,
    # a map as a map of the same tiles (what a module's full backward hook does to its in/outputs)
    Tensor.view_as,
}
_PRODUCTS = {torch.mul, Tensor.mul, Tensor.mul_, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__}
_QUOTIENTS = {torch.div, Tensor.div, Tensor.div_, Tensor.__truediv__, Tensor.__itruediv__}
_SUMS = {torch.add, torch.sub, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__,
         Tensor.__iadd__, Tensor.sub, Tensor.sub_, Tensor.__sub__, Tensor.__rsub__, Tensor.__isub__}
# (lower, upper) bound parameters and their defaults: zero to zero iff lower <= 0 <= upper.
_CLAMPS = {torch.clamp: (("min", None), ("max", None)), Tensor.clamp: (("min", None), ("max", None)),
           Tensor.clamp_: (("min", None), ("max", None)), Tensor.clamp_min: (("min", None),),
           Tensor.clamp_min_: (("min", None),), F.hardtanh: (("min_val", -1.0), ("max_val", 1.0))}
_IN_PLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__"}

# Layers of the masked network (or layers it refuses): a PackedMap reaching one means a module
# that sparsify did not convert, which would compute over removed positions as if they were data.
_LAYERS = {
    F.conv2d, torch.conv2d, torch.conv_transpose2d, F.batch_norm, torch.batch_norm,
    F.instance_norm, F.group_norm, F.layer_norm, F.local_response_norm, F.max_pool2d,
    F.max_pool2d_with_indices, torch.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices, F.lp_pool2d,
    F.fractional_max_pool2d, F.interpolate, F.pixel_shuffle, F.pixel_unshuffle, F.unfold,
    # nn.SyncBatchNorm's cross-rank path (CUDA, world size > 1) calls these inside its autograd
    # Function, which hands them the map as is: statistics over the dense map would count the
    # zeros of removed blocks
    *(getattr(torch, n) for n in ("batch_norm_stats", "batch_norm_elemt", "batch_norm_backward_reduce",
                                   "batch_norm_backward_elemt") if hasattr(torch, n)),
}


def _dropout2d(x: "PackedMap", p: float = 0.5, training: bool = True, inplace: bool = False):
    """``F.dropout2d`` (``nn.Dropout2d``) of a map: whole (sample, channel) planes dropped, as on
    the dense map, each tile scaled by its sample's draw; identity when not training."""
    if not 0.0 <= p <= 1.0:  # F.dropout2d's own check and message
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0:
        return x
    N, C = x.dense_shape[:2]
    tiles = x.tiles
    keep = torch.empty((N, C), dtype=tiles.dtype, device=tiles.device).bernoulli_(1 - p)
    scale = (keep / (1 - p) if p < 1 else keep).index_select(0, x.index.kept[:, 0])[:, :, None, None]
    if inplace:
        tiles.mul_(scale)
        return x
    return PackedMap.from_tiles(tiles * scale, x.index, x.mask)


def _size(p: "PackedMap", dim=None):
    if dim is None:
        return p.dense_shape
    if not -4 <= dim < 4:  # torch's message, not a tuple's IndexError
        raise IndexError(f"Dimension out of range (expected to be in range of [-4, 3], but got {dim})")
    return p.dense_shape[dim]


def _dense_layout(p: "PackedMap") -> Tensor:
    """A meta tensor laid out as the dense map that ops off the tiles see (to_dense()'s,
    contiguous): layout queries answer from it without unpacking."""
    return torch.empty(p.dense_shape, device="meta")


def _register_hook(p: "PackedMap", hook):
    """``Tensor.register_hook`` of a map: the hook gets the gradient as a PackedMap (and may
    return one, a dense map of the same shape, or None), as it would get the dense map's."""
    index, mask = p._effssl_index, p._effssl_mask

    def on_tiles(g):
        out = hook(PackedMap.from_tiles(g, index, mask))
        if out is None or isinstance(out, PackedMap):
            return None if out is None else out.tiles
        return pack(out, index)  # the dense gradient's removed positions are never read

    with _DisableSubclass():
        # Read grad_fn first and hold it: after an in-place op on an alias of the tiles (every
        # in-place op on the map runs on one) its history is regenerated on first read, and
        # torch 2.14 segfaults when register_hook itself does that read for a subclass.
        fn = p.grad_fn  # noqa: F841
        return Tensor.register_hook(p, on_tiles)


def _grad(p: "PackedMap"):
    """``.grad`` of a map (a leaf, or after ``retain_grad``): the packed gradient as a PackedMap."""
    with _DisableSubclass():
        g = Tensor.grad.__get__(p)
    return None if g is None else PackedMap.from_tiles(g, p._effssl_index, p._effssl_mask)


def _set_grad(p: "PackedMap", g) -> None:
    """``p.grad = g``: None, a PackedMap of the same tiles or a dense map (packed)."""
    if g is not None:
        g = g.tiles if isinstance(g, PackedMap) else pack(g, p._effssl_index)
    with _DisableSubclass():
        Tensor.grad.__set__(p, g)


def _grad_as_tiles(out, g, what: str):
    """The gradient ``g`` of an autograd output ``out`` as autograd sees it: a map's as its
    tiles (a PackedMap's own, or a dense ``[N, C, H, W]`` one packed: its removed positions
    are never read), a plain output's dense."""
    if isinstance(g, PackedMap):
        if isinstance(out, PackedMap) and g._effssl_index.same_tiles(out._effssl_index):
            return g.tiles
        g = g.to_dense()
    if not isinstance(out, PackedMap) or g is None or isinstance(g, torch.autograd.graph.GradientEdge):
        return g
    if not isinstance(g, Tensor) or tuple(g.shape) != tuple(out.dense_shape):
        raise ValueError(f"PackedMap: {what} for a map of shape {tuple(out.dense_shape)} must be a "
                         f"PackedMap of its tiles or a tensor of that shape, got "
                         f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}")
    return pack(g, out._effssl_index)


def _as_tuple(v, n: int = 0) -> tuple:
    """torch's reading of a tensors or gradients argument: one tensor, or a sequence (None: ``n``
    Nones, one per output)."""
    if v is None:
        return (None,) * n
    return (v,) if isinstance(v, Tensor) else tuple(v)


def _backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None, **kw):
    """``torch.autograd.backward`` with maps: each map is its own node on the graph (its
    tiles'), so maps among ``inputs`` get their ``.grad`` (as the dense fallback's copy would
    not) and maps among ``tensors`` take packed or dense gradients without unpacking."""
    tensors = _as_tuple(tensors)
    grads = tuple(_grad_as_tiles(t, g, "the gradient")
                  for t, g in zip(tensors, _as_tuple(grad_tensors, len(tensors)), strict=True))
    with _DisableSubclass():
        return torch.autograd.backward(tensors, grads, retain_graph, create_graph, inputs=inputs, **kw)


def _tensor_backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    return _backward((self,), (gradient,), retain_graph, create_graph, inputs=inputs)


def _autograd_grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False,
                   only_inputs=True, allow_unused=None, is_grads_batched=False, **kw):
    """``torch.autograd.grad`` with maps: as :func:`_backward`; the gradient of a map among
    ``inputs`` comes back a PackedMap of its tiles (the dense fallback differentiated a copy made
    after the graph: "not used in the graph")."""
    outputs, inputs = _as_tuple(outputs), _as_tuple(inputs)
    if is_grads_batched and any(isinstance(t, PackedMap) for t in outputs):
        raise NotImplementedError("PackedMap: torch.autograd.grad(is_grads_batched=True) with a "
                                  "map among the outputs; differentiate its .to_dense() instead")
    grads = tuple(_grad_as_tiles(t, g, "grad_outputs")
                  for t, g in zip(outputs, _as_tuple(grad_outputs, len(outputs)), strict=True))
    with _DisableSubclass():
        res = torch.autograd.grad(outputs, inputs, grads, retain_graph, create_graph, only_inputs,
                                  allow_unused, is_grads_batched, **kw)
    return tuple(PackedMap.from_tiles(g, i._effssl_index, i._effssl_mask)
                 if isinstance(i, PackedMap) and g is not None else g for i, g in zip(inputs, res))


def _fresh_dense(p: "PackedMap", *args, func=None, **kwargs):
    """``func`` on a dense copy made for it alone: handles that share its memory (``.data``,
    ``.numpy()``) must not alias to_dense()'s cached copy, which a write through them would
    change behind the cache's version check."""
    dense = unpack(p.tiles.detach(), p._effssl_index, p.dense_shape)
    with _DisableSubclass():
        return func(dense, *args, **kwargs)


# Answered on the map itself, without unpacking the cached dense copy: nn.Dropout2d (above),
# gradient hooks, handles that share memory, and metadata queries. Dense geometry and layout
# (the dense map's, contiguous: what ops off the tiles see):
_DENSE_META = {
    F.dropout2d: _dropout2d,
    Tensor.shape.__get__: lambda p: p.dense_shape,
    Tensor.size: _size,
    Tensor.dim: lambda p: 4,
    Tensor.ndim.__get__: lambda p: 4,
    Tensor.numel: lambda p: p.dense_shape.numel(),
    Tensor.stride: lambda p, dim=None: _dense_layout(p).stride() if dim is None else _dense_layout(p).stride(dim),
    Tensor.is_contiguous: lambda p, memory_format=torch.contiguous_format:
        _dense_layout(p).is_contiguous(memory_format=memory_format),
    Tensor.register_hook: _register_hook,
    Tensor.backward: _tensor_backward,
    torch.autograd.backward: _backward,
    torch.autograd.grad: _autograd_grad,
    Tensor.grad.__get__: _grad,
    Tensor.grad.__set__: _set_grad,
    Tensor.data.__get__: lambda p: _fresh_dense(p, func=Tensor.data.__get__),
    Tensor.numpy: lambda p, *a, **k: _fresh_dense(p, *a, func=Tensor.numpy, **k),
    Tensor.__array__: lambda p, *a, **k: _fresh_dense(p, *a, func=Tensor.__array__, **k),
}
# ... and the tiles' (the same for the dense map):
_TILE_META = {Tensor.dtype.__get__, Tensor.device.__get__, Tensor.requires_grad.__get__,
              Tensor.grad_fn.__get__, Tensor.is_cuda.__get__, Tensor.layout.__get__,
              Tensor.is_floating_point, Tensor.element_size, Tensor.requires_grad_,
              Tensor.is_leaf.__get__, Tensor.data_ptr, Tensor.get_device, Tensor.retain_grad,
              Tensor.retains_grad.__get__, Tensor.requires_grad.__set__, Tensor._version.__get__,
              Tensor.register_post_accumulate_grad_hook,  # (a leaf map; the hook gets the map)
              # torch sets these from C++ while it regenerates the history of a map changed in
              # place (holding the tensor's autograd lock): unpacking there deadlocked
              Tensor._backward_hooks.__get__, Tensor._backward_hooks.__set__,
              # new tensors of a given shape take only dtype and device from the map
              Tensor.new_empty, Tensor.new_zeros, Tensor.new_ones, Tensor.new_full,
              Tensor.new_tensor}

_WARNED: set = set()


def _name(func) -> str:
    name = getattr(func, "__name__", repr(func))
    if name in ("__get__", "__set__", "__delete__") and hasattr(getattr(func, "__self__", None), "__name__"):
        return f"Tensor.{func.__self__.__name__}"  # a property: its own name (and warning)
    return name


def _saved_tensors_hooks():
    """The pack hook of the innermost ``saved_tensors_hooks`` in force, None where there is
    none, ``_UNKNOWN`` where this torch cannot say. A non-reentrant checkpoint installs hooks for
    its forward and others for each recomputation."""
    if torch.compiler.is_compiling():
        return None  # a compiled checkpoint is one traced region: no eager recomputation
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return _UNKNOWN
    try:
        hooks = top(False)
    except TypeError:  # another signature in a torch we have not run: cache off, never stale
        return _UNKNOWN
    return None if hooks is None else hooks[0]


_UNKNOWN = object()


def _hooks_ref(hooks):
    """What a cache entry keeps of ``hooks``: None for none, else a weak reference."""
    return None if hooks is None or hooks is _UNKNOWN else weakref.ref(hooks)


def _same_hooks(ref, hooks) -> bool:
    if hooks is _UNKNOWN:
        return False  # never reuse a copy
    if ref is None:
        return hooks is None
    live = ref()  # None once the hooks are gone: never equal to "no hooks"
    return live is not None and live is hooks


class PackedMap(Tensor):
    """The dense ``[N, C, H, W]`` masked map of ``index`` held as its tiles ``[T, C, bh, bw]``.
    Build with :meth:`from_tiles` (or :func:`pack_map`), read with :attr:`tiles` /
    :meth:`to_dense`. See the module docstring for which ops stay packed."""

    _effssl_index: TileIndex
    _effssl_mask: BlockMask

    @staticmethod
    def from_tiles(tiles: Tensor, index: TileIndex, mask: BlockMask) -> "PackedMap":
        """Wrap packed ``tiles`` ``[T, C, bh, bw]`` of ``index`` (an alias: autograd flows)."""
        if not isinstance(index, TileIndex) or not isinstance(mask, BlockMask):
            raise TypeError(f"PackedMap.from_tiles(tiles, index, mask): expected a TileIndex and a "
                            f"BlockMask, got {type(index).__name__} and {type(mask).__name__}")
        if not (isinstance(tiles, Tensor) and tiles.is_floating_point()):
            raise TypeError(f"PackedMap: tiles must be a floating-point tensor, got "
                            f"{getattr(tiles, 'dtype', type(tiles).__name__)}")
        with _DisableSubclass():
            if tiles.dim() != 4 or tiles.shape[0] != index.num_tiles or \
                    tuple(tiles.shape[2:]) != index.tile:
                raise ValueError(f"PackedMap: tiles {tuple(tiles.shape)} do not match {index}")
            out = tiles.as_subclass(PackedMap)
        out._effssl_index = index
        out._effssl_mask = mask
        return out

    @property
    def index(self) -> TileIndex:
        return self._effssl_index

    @property
    def mask(self) -> BlockMask:
        return self._effssl_mask

    @property
    def tiles(self) -> Tensor:
        """The packed ``[T, C, bh, bw]`` plain tensor (an alias on the autograd graph)."""
        with _DisableSubclass():
            return self.as_subclass(Tensor)

    @property
    def dense_shape(self) -> torch.Size:
        with _DisableSubclass():
            c = self.shape[1]
        return torch.Size((self._effssl_index.batch, c, *self._effssl_index.size))

    def to_dense(self, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
        """The dense ``[N, C, H, W]`` map, zeros under removed blocks (differentiable). Cached
        until the tiles change, so the two branches of a residual block that both leave the
        packed layout unpack once. Changing the result in place does not change the map (the
        next call unpacks afresh)."""
        tiles = self.tiles
        if tiles.is_inference():
            # Inference tensors have no version counter to key a cache on (and may change in
            # place inside inference mode): unpack every time.
            return unpack(tiles, self._effssl_index, self.dense_shape, memory_format)
        # Whether the copy carries the tiles' graph belongs in the key: one unpacked under
        # no_grad (a logging hook, say) must not serve a later differentiable read.
        key = (tiles._version, memory_format, torch.is_grad_enabled() and tiles.requires_grad)
        hooks = _saved_tensors_hooks()
        cached = self.__dict__.get("_effssl_dense")
        # The copy's own version too: an in-place change to it, or to a view of it (views share
        # the counter), makes it stale. And the saved-tensors hooks it was made under: a
        # checkpoint's recomputation must unpack again, as its forward did, not reuse the
        # forward's copy (a different count of saved tensors is a CheckpointError).
        if (cached is not None and cached[0] == key and cached[1]._version == cached[2]
                and _same_hooks(cached[3], hooks)):
            return cached[1]
        dense = unpack(tiles, self._effssl_index, self.dense_shape, memory_format)
        self._effssl_dense = (key, dense, dense._version, _hooks_ref(hooks))
        return dense

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"PackedMap(dense_shape={tuple(self.dense_shape)}, {self._effssl_index})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DENSE_META:
            return _DENSE_META[func](*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        packed = [a for a in flat if isinstance(a, PackedMap)]
        if func in _TILE_META:
            with _DisableSubclass():
                return func(*args, **kwargs)
        name = _name(func)
        if func in _LAYERS:
            raise RuntimeError(
                f"PackedMap: {name} got a masked map: a layer that sparsify did not convert ran "
                f"under block_mask and would treat removed blocks as data. Modules added or "
                f"replaced after sparsify (nn.SyncBatchNorm.convert_sync_batchnorm, a new head) "
                f"are not converted: call sparsify(model) again after replacing modules (it "
                f"converts those still unconverted), or convert before sparsify")
        on_tiles = _tile_args(func, args, kwargs, packed)
        if on_tiles is not None:
            p0 = packed[0]
            tile_shape = p0.tiles.shape
            with _DisableSubclass():
                out = func(*on_tiles, **kwargs)
            if args[0] is p0 and out is on_tiles[0]:
                return p0  # in place (relu_, inplace=True): the map itself, as torch returns self
            if isinstance(out, Tensor) and out.dim() == 4 and out.shape[0] == tile_shape[0] \
                    and out.shape[2:] == tile_shape[2:]:
                return PackedMap.from_tiles(out, p0._effssl_index, p0._effssl_mask)
            return out
        if args and isinstance(args[0], PackedMap) and _in_place(name, kwargs):
            raise NotImplementedError(
                f"PackedMap: in-place {name} on a packed map is not supported here (it would "
                f"change a dense copy); call .to_dense() first")
        a2, k2 = tree_unflatten([a.to_dense() if isinstance(a, PackedMap) else a for a in flat],
                                spec)
        with _DisableSubclass():
            out = func(*a2, **k2)
        if name not in _WARNED:
            _WARNED.add(name)
            view = isinstance(out, Tensor) and out._is_view()
            warnings.warn(f"PackedMap: {name} does not run on the tiles; running it on the dense "
                          f"map (zeros under removed blocks; slower)"
                          + ("; its result is a view of a dense copy, so an in-place change through "
                             "it does not reach the packed map" if view else ""), stacklevel=2)
        return out


# A PackedMap reaching compiled code from eager code (a region compiled on its own, the eager
# fallback of a checkpoint) made Dynamo guard on the dense shape it reports while checking the
# tiles' (an internal AssertionError). Registered here, Dynamo treats it opaquely: code that uses
# it runs eagerly, or fullgraph raises (torch >= 2.12: Dynamo 2.8-2.11 have the setting but still
# guard on the dense shape; inside one compiled model maps stay dense).
_dynamo_config = getattr(getattr(torch, "_dynamo", None), "config", None)
if hasattr(_dynamo_config, "nontraceable_tensor_subclasses"):
    _dynamo_config.nontraceable_tensor_subclasses.add(PackedMap)


def _same_index(packed) -> bool:
    return all(p._effssl_index.same_tiles(packed[0]._effssl_index) for p in packed)


def _in_place(name: str, kwargs) -> bool:
    if name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("__")):
        return True
    # F.relu, F.hardtanh, ... hand ``inplace`` to __torch_function__ as a keyword always
    return kwargs.get("inplace") is True


def _is_number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _tile_args(func, args, kwargs, packed) -> Optional[list]:
    """The positional arguments of ``func`` on the tiles when running it there gives exactly the
    dense op on the dense maps (zeros stay zeros, see the module docstring), else None."""
    if not packed or not _same_index(packed) or "out" in kwargs \
            or any(isinstance(a, Tensor) for a in tree_flatten(kwargs)[0]):
        return None
    in_place = _in_place(_name(func), kwargs)
    if in_place and not isinstance(args[0], PackedMap):
        return None  # a plain tensor changed in place: the dense op does that
    if func in _CLAMPS:
        bounds = _CLAMPS[func]
        vals = [args[1 + i] if 1 + i < len(args) else kwargs.get(k, d)
                for i, (k, d) in enumerate(bounds)]
        if any(v is not None and not _is_number(v) for v in vals):
            return None
        lo, hi = vals[0], vals[1] if len(vals) > 1 else None
        if (lo is not None and lo > 0) or (hi is not None and hi < 0):
            return None
    elif func in _SUMS:
        # Zero where every term is: maps, the number 0, or (in place) a full dense map.
        for a in args:
            if not (isinstance(a, PackedMap) or (_is_number(a) and a == 0)
                    or (in_place and _full_map(a, packed[0]))):
                return None
    elif func in _QUOTIENTS:
        if not isinstance(args[0], PackedMap) or any(isinstance(a, PackedMap) for a in args[1:]):
            return None  # only a map divided by something else is zero where the map is
    elif func not in _UNARY and func not in _PRODUCTS:
        return None
    index = packed[0]._effssl_index
    out = []
    for a in args:
        if isinstance(a, PackedMap):
            out.append(a.tiles)
        elif not isinstance(a, Tensor):
            out.append(a)
        elif (func in _PRODUCTS or func in _SUMS) and _full_map(a, packed[0]):
            dt = torch.result_type(packed[0].tiles, a)  # e.g. a bool mask (x > 0): float
            if dt not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                return None  # complex: the dense op
            out.append(pack(a.to(dt), index))  # zero under removed blocks, as maps of this mask are
        else:
            kind = _broadcast_kind(a, index.batch)
            if kind is None:
                return None
            # Each tile takes its sample's row.
            out.append(a.index_select(0, index.kept[:, 0]) if kind == "sample" else a)
    return out


def _full_map(a, p: "PackedMap") -> bool:
    """Whether plain ``a`` is a dense map of ``p``'s shape and device."""
    return isinstance(a, Tensor) and not isinstance(a, PackedMap) and a.shape == p.dense_shape \
        and a.device == p.device


def _broadcast_kind(t: Tensor, batch: int):
    """How a plain tensor broadcasts against ``[N, C, H, W]`` in a way tiles can follow:
    'same' (a scalar, or constant over batch and space: ``[C, 1, 1]``, ``[1, C, 1, 1]``),
    'sample' (``[N, 1 or C, 1, 1]``: per sample, e.g. drop-path's keep mask), or None."""
    s = t.shape
    if t.dim() > 4:
        return None
    if t.numel() == 1 or (t.dim() >= 3 and s[-1] == 1 and s[-2] == 1
                          and (t.dim() == 3 or s[0] == 1)):
        return "same"
    if t.dim() == 4 and s[0] == batch and s[2] == 1 and s[3] == 1:
        return "sample"
    return None


def packing_enabled() -> bool:
    """Whether layers hand PackedMaps to each other: in eager mode. Under ``torch.compile`` the
    subclass does not trace (Dynamo guards on the real, packed size), so there each layer runs
    :func:`~effssl_kernels.sparse.sparse_conv2d` dense in, dense out (still kept tiles only
    inside the layer; the compiler sees and fuses the pack/unpack around it)."""
    return not torch.compiler.is_compiling()


def pack_map(x: Tensor, mask: BlockMask, stride: Tuple[int, int]) -> PackedMap:
    """Dense ``[N, C, H, W]`` at cumulative ``stride`` -> its :class:`PackedMap`
    (the resolution must be tile-aligned)."""
    index = TileIndex.from_mask(mask, stride)
    return PackedMap.from_tiles(pack(x, index), index, mask)


def as_dense(x: Tensor) -> Tensor:
    """``x.to_dense()`` for a PackedMap, ``x`` itself otherwise."""
    return x.to_dense() if isinstance(x, PackedMap) else x


def packed_avg_pool(x: PackedMap) -> Tensor:
    """Global average pool of a PackedMap: ``[N, C]``, the mean over each sample's kept pixels
    (zeros for a sample with none), float32 sums for fp16/bf16."""
    tiles, index = x.tiles, x.index
    acc = torch.float32 if tiles.dtype in (torch.float16, torch.bfloat16) else tiles.dtype
    N, C = index.batch, tiles.shape[1]
    n = index.kept[:, 0]
    sums = tiles.to(acc).sum(dim=(2, 3))
    total = sums.new_zeros((N, C)).index_add(0, n, sums)
    count = sums.new_zeros(N).index_add_(0, n, sums.new_ones(n.shape[0]))
    bh, bw = index.tile
    return (total / (count * (bh * bw)).clamp(min=1).view(N, 1)).to(tiles.dtype)


def max_pool2d_map(x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool, *,
                   mask: BlockMask, in_stride: Tuple[int, int]) -> Tensor:
    """``M_out * maxpool(M_in * x)``: on tiles where the pool is tile-aligned (removed neighbours
    read as zero, outside the image as -inf, max pooling's padding) -> PackedMap; otherwise
    masked-dense on the dense map."""
    stride = pool_stride(kernel_size, stride)
    halo = None
    if not ceil_mode and packing_enabled():
        halo = conv_tile_halo(kernel_size, stride, padding, dilation, mask=mask,
                              in_stride=in_stride, size=x.shape[-2:])
    if halo is None:
        return masked_max_pool2d_reference(as_dense(x), kernel_size, stride, padding, dilation,
                                           ceil_mode, mask=mask, in_stride=in_stride)
    tiles, idx_in = _tiles_at(x, mask, in_stride, "sparse max_pool2d")
    s = _positive_pair(stride, "stride")
    y = halo_max_pool2d(tiles, idx_in, halo, kernel_size, s, dilation)
    idx_out = TileIndex.from_mask(mask, (in_stride[0] * s[0], in_stride[1] * s[1]))
    return PackedMap.from_tiles(y, idx_out, mask)


def conv2d_map(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
               groups: int, *, mask: BlockMask, in_stride: Tuple[int, int]) -> Tensor:
    """:func:`~effssl_kernels.sparse.sparse_conv2d` that keeps maps packed: x dense or a
    PackedMap at cumulative ``in_stride``; a tile-aligned layer returns a PackedMap (packing a
    dense x first), any other runs masked-dense on the dense map and returns it dense."""
    halo = conv_tile_halo(weight.shape[-2:], stride, padding, dilation, mask=mask,
                          in_stride=in_stride, size=x.shape[-2:])
    if halo is None or not packing_enabled():
        return sparse_conv2d(as_dense(x), weight, bias, stride, padding, dilation, groups,
                             mask=mask, in_stride=in_stride)
    tiles, idx_in = _tiles_at(x, mask, in_stride, "sparse conv2d")
    groups = _check_weight(weight, bias, "sparse conv2d", tiles, groups)
    s = _positive_pair(stride, "stride")
    y = _conv_tiles(tiles, weight, bias, s, halo, dilation, groups, idx_in)
    idx_out = TileIndex.from_mask(mask, (in_stride[0] * s[0], in_stride[1] * s[1]))
    return PackedMap.from_tiles(y, idx_out, mask)


def _tiles_at(x: Tensor, mask: BlockMask, in_stride: Tuple[int, int], fn: str):
    """(tiles, index) of x at ``in_stride``: a PackedMap of that index as is, anything else
    (dense, or packed under another mask) packed from its dense map. A map of an equal mask's
    index is taken as is: a checkpoint's recomputation under a ``with`` of an equal but new mask
    must save what its forward saved, not a repack."""
    idx = TileIndex.from_mask(mask, in_stride)
    if isinstance(x, PackedMap) and x.index.same_tiles(idx):
        return x.tiles, idx
    x = as_dense(x)
    _check_x(x, mask, in_stride, fn)
    return pack(x, idx), idx


def batch_norm_map(x: PackedMap, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                   momentum: float, eps: float,
                   reduce: Optional[Callable[[Tensor], Tensor]] = None) -> PackedMap:
    """Masked BatchNorm of a PackedMap: ``F.batch_norm`` over ``[T, C, bh, bw]`` takes its
    statistics over kept pixels only, so it is section 2's BN as is. The reference (every tile
    pixel kept) runs instead when ``n = T * bh * bw`` is at most 1 in training (where
    F.batch_norm raises; the reference gives zeros and no update) and with ``reduce``, the
    cross-rank sum of SyncBatchNorm (see ``masked_batch_norm_reference``)."""
    tiles = x.tiles
    T, _, bh, bw = tiles.shape
    if reduce is not None or (training and T * bh * bw <= 1):
        ones = torch.ones((T, 1, bh, bw), dtype=torch.bool, device=tiles.device)
        y = masked_batch_norm_reference(tiles, ones, running_mean, running_var, weight, bias,
                                        training, momentum, eps, reduce=reduce)
    else:
        y = _batch_norm_float32_params(tiles, running_mean, running_var, weight, bias, training, momentum, eps)
    return PackedMap.from_tiles(y, x.index, x.mask)


def _batch_norm_float32_params(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                               weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                               momentum: float, eps: float) -> Tensor:
    """F.batch_norm of fp16/bf16 ``x`` with float32 parameters and running statistics: with half
    ones (``model.half()``) or none at all (``affine=False, track_running_stats=False``) its
    CPU kernel takes the statistics in half precision, which the masked-dense path and the
    reference never do. A missing weight is float32 ones; x and the output keep their dtype;
    updated half statistics are rounded back once."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)

    def up(t):
        return None if t is None else t.float()

    rm, rv = up(running_mean), up(running_var)
    w = up(weight) if weight is not None else torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
    y = F.batch_norm(x, rm, rv, w, up(bias), training, momentum, eps)
    if training:
        with torch.no_grad():
            for buf, new in ((running_mean, rm), (running_var, rv)):
                if buf is not None and buf is not new:  # .float() of a float32 buffer is itself
                    buf.copy_(new)
    return y
