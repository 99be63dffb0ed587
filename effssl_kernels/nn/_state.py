"""The per-call state of the swapped layers (the block mask, the kept tokens), readable by
``torch.compile`` on every supported torch.

A ``contextvars.ContextVar`` holds it: per thread and per asyncio task, and carried by a context
snapshot (``checkpoint`` recomputes under the forward's). Dynamo before torch 2.14 cannot trace
``ContextVar.get`` ("Dynamo does not know how to trace method `get` of class `ContextVar`", a
graph break that ``fullgraph=True`` turns into an error), so there every ``set`` also writes a
plain attribute, the mirror, which compiled code reads instead (torch 2.14 reads the ContextVar).
The mirror is process-wide: on torch < 2.14 a compiled sparse model called from one thread while
another thread is inside a ``with`` for a different mask sees that mask. Call compiled models
from one thread at a time there (eager calls always read the ContextVar).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import torch

_ALL: list["ContextState"] = []


# Dynamo traces ContextVar.get from torch 2.14 on (seen failing on 2.11; 2.12-2.13 untested)
_MIRRORED = torch.__version__ < "2.14"  # TorchVersion compares as a version, not a string


def _compiling() -> bool:
    return _MIRRORED and torch.compiler.is_compiling()


class ContextState:
    """A ContextVar (default None) with a mirror for traced code."""

    def __init__(self, name: str):
        self.var: contextvars.ContextVar = contextvars.ContextVar(name, default=None)
        self.mirror: Any = None
        _ALL.append(self)

    def get(self) -> Any:
        return self.mirror if _compiling() else self.var.get()

    @contextlib.contextmanager
    def bound(self, value: Any) -> Iterator[None]:
        """``value`` in force inside the ``with`` (the previous one restored after)."""
        tok, prev = self.var.set(value), self.mirror
        self.mirror = value
        try:
            yield
        finally:
            self.mirror = prev  # first: reset raises for a token of another Context
            self.var.reset(tok)


def run_in(snapshot: contextvars.Context, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a copy of ``snapshot`` with every mirror set from it, so that
    compiled code called there sees the snapshot's state too."""
    def body():
        prev = [s.mirror for s in _ALL]
        for s in _ALL:
            s.mirror = s.var.get()
        try:
            return fn(*args, **kwargs)
        finally:
            for s, p in zip(_ALL, prev):
                s.mirror = p

    return snapshot.copy().run(body)  # a Context cannot be entered twice: a fresh copy per call
