"""Class swapping shared by the converters (as ToMe's apply_patch): a module keeps its
parameters, buffers and state_dict keys; only its class gains a mixin that overrides forward."""
from __future__ import annotations

_SPARSE_CLASSES: dict = {}


def sparse_class(cls: type, mixin: type) -> type:
    """``Sparse<cls>`` = ``(mixin, cls)``, made once per class; ``_effssl_base`` names ``cls``
    so the converters can swap it back."""
    sub = _SPARSE_CLASSES.get((cls, mixin))
    if sub is None:
        sub = type(f"Sparse{cls.__name__}", (mixin, cls), {"_effssl_base": cls})
        _SPARSE_CLASSES[cls, mixin] = sub
    return sub
