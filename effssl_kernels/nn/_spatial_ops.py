"""Which torch calls mix a feature map's positions: ``sparsify``'s stride trace refuses them
outside the converted layers. Decided by the op and its ``dim`` arguments, not by the output's
shape: a ``x.mean((2, 3), keepdim=True)`` traced on a 1x1 map keeps the shape, yet under a mask it
would average removed positions as zeros."""
from __future__ import annotations

from torch import Tensor

from ..sparse.packed import _LAYERS

_ALL = object()  # the op's default reduces or mixes every dim

# name -> (position of the dim argument, its keyword names, default when absent)
_DIM_OPS = {
    **{n: (1, ("dim",), _ALL) for n in (
        "mean", "sum", "nansum", "nanmean", "amax", "amin", "std", "var", "std_mean", "var_mean",
        "logsumexp", "prod", "median", "nanmedian", "argmax", "argmin", "count_nonzero", "all",
        "any", "max", "min")},
    # without dim, softmax of a 4-D tensor picks dim 1 (torch's legacy implicit dim)
    **{n: (1, ("dim",), 1) for n in ("softmax", "log_softmax", "softmin")},
    **{n: (1, ("dim",), None) for n in ("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp")},
    **{n: (1, ("dim",), -1) for n in ("sort", "argsort", "mode")},
    **{n: (2, ("dim",), -1) for n in ("topk", "kthvalue")},
    "norm": (2, ("dim",), _ALL),
    "normalize": (2, ("dim",), 1),
    "flip": (1, ("dims",), None),
    "roll": (2, ("dims",), _ALL),
}
_SWAPS = {"transpose": ("dim0", "dim1"), "swapaxes": ("axis0", "axis1"), "swapdims": ("dim0", "dim1"),
          "movedim": ("source", "destination"), "moveaxis": ("source", "destination")}


def _dims(v) -> set[int] | None:
    if v is _ALL or (isinstance(v, (tuple, list)) and len(v) == 0):
        return {0, 1, 2, 3}
    if isinstance(v, int):
        return {v % 4}
    if isinstance(v, (tuple, list)) and all(isinstance(d, int) for d in v):
        return {d % 4 for d in v}
    return None  # a named dim or something else: not ours to judge


def spatial_use(func, args: tuple, kwargs: dict) -> str | None:
    """Why ``func(*args, **kwargs)``, whose first argument is a 4-D feature map, mixes its
    spatial positions; None when it does not (as far as the op and its arguments tell)."""
    name = getattr(func, "__name__", str(func))
    if func in _LAYERS:
        return (f"{name} is a layer function applied outside the modules sparsify converts, so "
                f"under a mask it would treat removed blocks as data; use the module form "
                f"(nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d(1)) or move it "
                f"after the global pool")
    if name in _SWAPS:
        keys = _SWAPS[name]
        pair = [args[i] if len(args) > i else kwargs.get(k) for i, k in zip((1, 2), keys)]
        a, b = (_dims(p) for p in pair)
        if a is not None and b is not None and a != b and (a | b) & {2, 3}:
            return f"{name} moves the spatial dims of a feature map"
        return None
    if name == "permute":
        order = args[1:] if len(args) > 2 else (args[1] if len(args) > 1 else kwargs.get("dims"))
        if isinstance(order, (tuple, list)) and len(order) == 4 and all(isinstance(d, int) for d in order):
            if [d % 4 for d in order][2:] != [2, 3]:
                return "permute moves the spatial dims of a feature map"
        return None
    spec = _DIM_OPS.get(name)
    if spec is None:
        return None
    pos, keys, default = spec
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], Tensor):
        return None  # elementwise max / min of two maps
    v = args[pos] if len(args) > pos else next((kwargs[k] for k in keys if k in kwargs), default)
    dims = _dims(_ALL if v is None and default is _ALL else v)
    if dims is not None and dims & {2, 3}:
        return (f"{name} over the spatial dims of a feature map would count removed positions as "
                f"zeros under a mask (or move them); use nn.AdaptiveAvgPool2d(1) (the mean over "
                f"kept positions) for a global average, then act on the pooled vector")
    return None
