"""Which torch calls mix a feature map's positions: ``sparsify``'s stride trace refuses them
outside the converted layers. Decided by the op and its ``dim`` arguments, not by the output's
shape: a ``x.mean((2, 3), keepdim=True)`` traced on a 1x1 map keeps the shape, yet under a mask it
would average removed positions as zeros. A list of named ops: one it does not name that mixes
positions and keeps the shape is not seen (the trace's shape checks catch the rest)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..sparse.packed import _LAYERS

_ALL = object()  # every dim

# name -> (position of the dim argument, its keyword names, default when absent, meaning of None)
_REDUCTIONS = (
    "mean", "sum", "nansum", "nanmean", "amax", "amin", "aminmax", "std", "var", "std_mean", "var_mean",
    "logsumexp", "prod", "median", "nanmedian", "argmax", "argmin", "count_nonzero", "all", "any", "max", "min",
)
_DIM_OPS = {
    **{n: (1, ("dim", "axis"), _ALL, _ALL) for n in _REDUCTIONS},
    # without dim, softmax of a 4-D tensor picks dim 1 (torch's legacy implicit dim)
    **{n: (1, ("dim", "axis"), 1, 1) for n in ("softmax", "log_softmax", "softmin")},
    **{n: (1, ("dim", "axis"), None, None) for n in ("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp")},
    **{n: (1, ("dim", "axis"), -1, None) for n in ("sort", "argsort", "mode")},
    **{n: (2, ("dim", "axis"), -1, None) for n in ("topk", "kthvalue", "diff")},
    **{n: (2, ("dim", "axis"), _ALL, _ALL) for n in ("norm", "linalg_norm", "linalg_vector_norm", "quantile", "nanquantile")},
    "linalg_matrix_norm": (2, ("dim", "axis"), (-2, -1), None),
    "normalize": (2, ("dim", "axis"), 1, _ALL),
    "roll": (2, ("dims", "axis"), _ALL, _ALL),
    "rot90": (2, ("dims", "axis"), (0, 1), None),
    "flip": (1, ("dims", "axis"), None, None),  # and x.flip(1, 3): varargs, read below
}
# slices along any dim span the others (H and W among them)
_ALWAYS = {"renorm", "T", "H", "mT", "mH"}
_REORDERS = {"transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "permute"}


def _dims(v) -> set[int] | None:
    if v is _ALL or (isinstance(v, (tuple, list)) and len(v) == 0):
        return {0, 1, 2, 3}
    if isinstance(v, int):
        return {v % 4}
    if isinstance(v, (tuple, list)) and all(isinstance(d, int) for d in v):
        return {d % 4 for d in v}
    return None  # a named dim or something else: not ours to judge


def _name(func) -> str:
    name = getattr(func, "__name__", str(func))
    if name == "__get__":  # a property (x.mT): the descriptor's name
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def spatial_use(func, args: tuple, kwargs: dict) -> str | None:
    """Why ``func(*args, **kwargs)``, whose input is a 4-D feature map (``args[0]`` or
    ``input=``), mixes or moves its positions or samples (each sample has its own mask); None when
    it does not (as far as the op and its arguments tell)."""
    name = _name(func)
    if func in _LAYERS:
        return (f"{name} is a layer function applied outside the modules sparsify converts, so "
                f"under a mask it would treat removed blocks as data; use the module form "
                f"(nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d(1)) or move it "
                f"after the global pool")
    if name in _ALWAYS:
        return f"{name} mixes or moves the spatial positions of a feature map"
    if name in _REORDERS:
        # where the spatial dims end up: the op on an empty meta tensor of distinct sizes
        rest = args[1:] if args and isinstance(args[0], Tensor) else args
        try:
            probe = func(torch.empty(2, 3, 5, 7, device="meta"), *rest,
                         **{k: v for k, v in kwargs.items() if k not in ("input", "self")})
        except Exception:  # noqa: BLE001 - arguments the probe cannot take: the real call judged them
            return None
        if probe.shape[0] != 2 or tuple(probe.shape[2:]) != (5, 7):
            return f"{name} moves the batch or spatial dims of a feature map"
        return None
    spec = _DIM_OPS.get(name)
    if spec is None:
        return None
    pos, keys, default, none_means = spec
    if name in ("max", "min") and (
            (len(args) > 1 and isinstance(args[1], Tensor)) or isinstance(kwargs.get("other"), Tensor)):
        return None  # elementwise max / min of two maps
    if name == "flip" and len(args) > 2:
        v = args[1:]  # x.flip(1, 3)
    else:
        v = args[pos] if len(args) > pos else next((kwargs[k] for k in keys if k in kwargs), default)
    dims = _dims(none_means if v is None else v)
    if dims is not None and dims & {0, 2, 3}:  # each sample has its own mask: the batch dim too
        return (f"{name} over the batch or spatial dims of a feature map would count removed "
                f"positions as zeros under a mask (or move them); use nn.AdaptiveAvgPool2d(1) (the "
                f"mean over kept positions) for a global average, then act on the pooled vector")
    return None
