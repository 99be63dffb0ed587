"""Class swapping shared by the converters (as ToMe's apply_patch): a module keeps its
parameters, buffers and state_dict keys; only its class gains a mixin that overrides forward.

The swapped classes are made at run time, so pickle (``torch.save(model)``, spawn-based
multiprocessing) could not find them by name. Each gets a stable ``__qualname__`` in this module,
``Sparse[<cls>+<mixin>]`` with each class written ``module/qualname`` (dots as ``:``), and the
module ``__getattr__`` rebuilds the class from that name in a process that has not made it yet.
"""
from __future__ import annotations

import importlib
import re

_SPARSE_CLASSES: dict = {}
_NAME = re.compile(r"Sparse\[([^/+\[\]]+)/([^/+\[\]]+)\+([^/+\[\]]+)/([^/+\[\]]+)\]")


def _ref(cls: type) -> str:
    return f"{cls.__module__}/{cls.__qualname__}".replace(".", ":")


def _resolve(module: str, qualname: str) -> type:
    obj = importlib.import_module(module.replace(":", "."))
    for part in qualname.split(":"):
        obj = getattr(obj, part)
    return obj


def _refuse_script(module):
    """torch.jit.script calls this on every submodule first: a swapped one cannot be scripted
    (its forward reads a Python ContextVar and runs torch.library ops on a tensor subclass)."""
    undo = getattr(type(module), "_effssl_undo", "unsparsify")  # the mixin's: sparsify_vit's is unsparsify_vit
    raise TypeError(
        f"effssl_kernels: {type(module)._effssl_base.__name__} was swapped by sparsify / "
        f"sparsify_vit and cannot be compiled by torch.jit.script; script "
        f"effssl_kernels.{undo}(model) (the dense model), or use torch.compile / torch.export")


def sparse_class(cls: type, mixin: type) -> type:
    """``Sparse<cls>`` = ``(mixin, cls)``, made once per class; ``_effssl_base`` names ``cls``
    so the converters can swap it back. Picklable by name when ``cls`` and ``mixin`` are."""
    sub = _SPARSE_CLASSES.get((cls, mixin))
    if sub is None:
        sub = type(f"Sparse{cls.__name__}", (mixin, cls),
                   {"_effssl_base": cls, "__prepare_scriptable__": _refuse_script})
        sub.__module__ = __name__
        sub.__qualname__ = f"Sparse[{_ref(cls)}+{_ref(mixin)}]"  # no dot: one attribute here
        _SPARSE_CLASSES[cls, mixin] = sub
    return sub


def __getattr__(name: str) -> type:
    """The swapped class a pickle names (``Sparse[...]``), made on first use."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        cls, mixin = _resolve(*m.group(1, 2)), _resolve(*m.group(3, 4))
    except (ImportError, AttributeError) as e:
        raise AttributeError(f"{__name__}: cannot rebuild the sparse class {name!r}: {e}") from e
    return sparse_class(cls, mixin)
