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
import sys
import threading
import warnings
import weakref
from typing import Any, Iterator

import torch

from ..sparse.packed import _UNKNOWN, _saved_tensors_hooks

_ALL: list["ContextState"] = []
_UNSET = object()


# Dynamo traces ContextVar.get from torch 2.14 on (seen failing on 2.11; 2.12-2.13 untested)
_MIRRORED = torch.__version__ < "2.14"  # TorchVersion compares as a version, not a string


def _compiling() -> bool:
    return _MIRRORED and torch.compiler.is_compiling()


# Dynamo before torch 2.12 folds torch.compiler.is_exporting() to True in every trace, compile
# included (seen on 2.10 and 2.11); from 2.12 on it is True only in a strict export's trace.
_DYNAMO_KNOWS_EXPORT = torch.__version__ >= "2.12"


def _exporting_here() -> bool:
    """Whether this thread is inside a torch.export trace. ``is_exporting()`` is one flag for the
    process (another thread's export sets it), so it also takes this thread's fake-tensor mode,
    which non-strict export runs the model under. Strict export traces with Dynamo, which cannot
    run that query: there the flag alone answers, from torch 2.12 on; before, Dynamo folds the
    flag to True while it traces anything (torch.compile too), so a Dynamo trace cannot tell a
    strict export from a compile and is never this check's export. A torch without the flag
    (2.6) has the fake-tensor mode alone: any run under one counts (until 2026-12-06 none did,
    and a non-strict export there recorded the `with`'s tensors silently)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if torch.compiler.is_dynamo_compiling():
        return _DYNAMO_KNOWS_EXPORT and is_exporting is not None and is_exporting()
    if is_exporting is not None and not is_exporting():
        return False
    return _fake_mode_here()


def _fake_mode_here() -> bool:
    """Whether this thread runs under a fake-tensor mode (a query Dynamo < 2.12 cannot trace)."""
    try:
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    except AttributeError:  # a torch without the query: the process-wide flag alone
        return True


class ContextState:
    """A ContextVar (unset: None, with a warning when another thread has one) with a mirror for
    traced code."""

    def __init__(self, name: str, what: str = "it"):
        # _UNSET (never set in this context) differs from None (a `with` of None: "no mask here")
        self.var: contextvars.ContextVar = contextvars.ContextVar(name, default=_UNSET)
        self.mirror: Any = None  # the newest value of the `with`s in force in any thread, or None
        # The `with`s in force, oldest first: threads exit theirs in any order, so the mirror is
        # the newest still in force (a saved-and-restored previous value went stale when two
        # threads' `with`s interleaved).
        self._active: list[tuple[object, Any]] = []
        self._lock = threading.Lock()
        self.what = what  # for the warning below: "block_mask", "token_keep"
        self.warned = False
        # whether the `with` in force in this context was entered inside a torch.export trace
        self.exported: contextvars.ContextVar = contextvars.ContextVar(name + "_exported", default=False)
        _ALL.append(self)

    def _sync_mirror(self) -> None:
        self.mirror = self._active[-1][1] if self._active else None

    def get(self) -> Any:
        value = self._get()
        if value is not None and torch.jit.is_tracing():
            # TorchScript's trace (torch.onnx.export's TorchScript path too) records the tile
            # count and the kept positions as constants, wherever the `with` was entered.
            raise RuntimeError(
                f"effssl_kernels: torch.jit.trace (or the TorchScript-based torch.onnx.export) "
                f"of a model called inside a {self.what} would record it as constants of the "
                f"trace, applied to every later input. Trace outside the `with` (the dense "
                f"model, or ek.unsparsify(model) first), or torch.export a wrapper that takes the "
                f"keep as an input (README, 'torch.compile and export')")
        if value is not None and _exporting_here() and not self.exported.get():
            # torch.export would bake the tensors of a `with` entered outside it into the
            # program as constants: the exported model would then apply this one mask forever,
            # whatever is in force when it runs.
            raise RuntimeError(
                f"effssl_kernels: torch.export of a model called inside a {self.what} entered "
                f"outside the export would record its tensors as constants of the exported "
                f"program, which would apply them to every later input. Export a wrapper whose "
                f"forward takes the keep tensor as an input and enters the {self.what} itself "
                f"(README, 'torch.compile and export'), or export outside the `with` (the dense "
                f"model)")
        return value

    def _get(self) -> Any:
        if _compiling():
            return self.mirror
        value = self.var.get()
        if value is not _UNSET:
            return value
        if not torch.compiler.is_compiling() and self.mirror is not None and not self.warned:
            # Another thread is inside a `with` this one never entered: nn.DataParallel's replicas
            # run in threads, which start with an empty context, so they would run unmasked.
            self.warned = True
            warnings.warn(f"effssl_kernels: a {self.what} is in force in another thread but not in "
                          f"this one, so this call runs without it. nn.DataParallel replicas run in "
                          f"threads and never see it: use DistributedDataParallel (one process per "
                          f"GPU), or enter the `with` in the thread that calls the model (`with "
                          f"{self.what}(None)` there says that no {self.what} is meant)",
                          RuntimeWarning, stacklevel=4)
        return None

    @contextlib.contextmanager
    def bound(self, value: Any) -> Iterator[None]:
        """``value`` in force inside the ``with`` (the previous one restored after)."""
        key = object()
        tok_exported = self.exported.set(_exporting_here())
        tok = self.var.set(value)
        with self._lock:
            self._active.append((key, value))
            self._sync_mirror()
        try:
            yield
        finally:
            with self._lock:  # first: reset raises for a token of another Context
                self._active = [e for e in self._active if e[0] is not key]
                self._sync_mirror()
            self.var.reset(tok)
            self.exported.reset(tok_exported)


def run_in(snapshot: contextvars.Context, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a copy of ``snapshot`` with every mirror set from it, so that
    compiled code called there sees the snapshot's state too."""
    def body():
        for s in _ALL:
            s.mirror = s.var.get(None)
        tok = _RESTORED.set(graph_task_id() != -1)
        try:
            return fn(*args, **kwargs)
        finally:
            _RESTORED.reset(tok)
            for s in _ALL:
                with s._lock:
                    s._sync_mirror()

    return snapshot.copy().run(body)  # a Context cannot be entered twice: a fresh copy per call


# ----------------------------------------------------------------------------- recomputation
graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)  # -1: not inside backward
# True inside a recomputation run by run_in (masked_checkpoint): it restores the forward's own
# settings, so there is nothing to check.
_RESTORED: contextvars.ContextVar = contextvars.ContextVar("effssl_restored_recompute", default=False)


def check_recompute(module, setting: tuple | None, name: str) -> tuple | None:
    """Refuse a recomputation inside backward (a plain checkpoint) that runs a swapped layer
    under another ``name`` setting than its forward ran under: without it (backward outside the
    ``with``: the dense layer's gradients, silently with ``use_reentrant=True``), or under another
    ``with`` of the same size (another keep of the same count: the other view's tokens or tiles,
    silently, since checkpoint compares shapes only; until 2026-12-06 only the first was caught).

    ``setting``: None when nothing is in force, else a tuple identifying it (tensors compared by
    identity, then by value; other items by ``==``). A forward that backward may recompute (one
    under a saved-tensors hook, a non-reentrant checkpoint's, or inside an autograd Function's
    forward, a reentrant checkpoint's) notes its setting per checkpoint (torch's checkpoint frame,
    or the reentrant checkpoint's ``ctx``), so each recomputation is compared
    with its own forward, and per module (the last such forward: the fallback where no
    checkpoint is recognised). A plain forward saves its tensors and a no_grad one builds no
    graph, so neither is recomputed and neither changes a note. masked_checkpoint, whose
    recomputation restores the forward's own settings, is never checked; compiled code skips the
    check (a compiled region recomputes itself). Per forward: a dense no_grad forward of a module
    never noted otherwise reads one dict entry; any other a hooks query (grad on) or a bounded
    stack search (grad off); the error text is built only when raised. The module note keeps the
    last keep tensor alive (``unsparsify`` drops it).

    Returns, in a recomputation whose setting passed, the setting its forward noted (a caller
    may carry more in it than is compared: nn/resnet.py's keep settings carry the image size);
    else None."""
    if torch.compiler.is_compiling():
        return None
    noted = module.__dict__.get("_effssl_setting")  # None (dense) until noted otherwise
    if graph_task_id() == -1:  # an ordinary forward
        if setting is None and noted is None and not torch.is_grad_enabled():
            return  # an eval / teacher forward: only a reentrant checkpoint could recompute it
        recomputable, key = _forward_checkpoint()
        if recomputable:
            module.__dict__["_effssl_setting"] = setting
            if key is not None:
                per = _BY_CHECKPOINT.get(key)
                if per is None:
                    per = _BY_CHECKPOINT[key] = weakref.WeakKeyDictionary()
                per[module] = setting
        return
    if _RESTORED.get():
        return
    key = _hook_checkpoint(_saved_tensors_hooks())
    if key is None:
        key = _ctx_of(_ctx_frame(("forward", "backward"), 1))
    per = _BY_CHECKPOINT.get(key) if key is not None else None
    if per is not None and module in per:
        noted = per[module]
    if not _same_setting(noted, setting):
        ran = f"under a {name}" if noted is not None else f"without a {name}"
        now = f"a different {name}" if setting is not None and noted is not None else (
            f"a {name}" if setting is not None else f"no {name}")
        raise RuntimeError(
            f"sparse {type(module)._effssl_base.__name__}: its forward ran {ran} and is recomputed "
            f"during backward under {now} (torch.utils.checkpoint, or timm's grad checkpointing, "
            f"with backward outside the forward's `with` or inside another one, or the module ran "
            f"checkpointed under another setting since), which would give wrong gradients: "
            f"checkpoint with effssl_kernels.masked_checkpoint")
    return noted


# {checkpoint: {module: setting}} of the forwards a checkpoint may recompute; entries go with the
# checkpoint (its graph), so nothing outlives backward.
_BY_CHECKPOINT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _hook_checkpoint(fn):
    """torch's non-reentrant checkpoint frame, read from the closure of the saved-tensors pack
    hook ``fn`` (``frame`` in the forward, ``target_frame_ref`` in a recomputation); None for no
    hook or one not recognised."""
    if fn is None or fn is _UNKNOWN:
        return None
    while hasattr(fn, "__wrapped__"):  # torch 2.14 wraps the recomputation hook
        fn = fn.__wrapped__
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not cells:
        return None
    names = dict(zip(code.co_freevars, cells))
    try:
        if "frame" in names:
            return names["frame"].cell_contents
        if "target_frame_ref" in names:
            return names["target_frame_ref"].cell_contents()
    except (ValueError, TypeError):  # an empty cell or another layout: not recognised
        return None
    return None


def _ctx_of(frame):
    """The ``ctx`` of an autograd Function's ``forward`` / ``backward`` frame (a reentrant
    checkpoint's, kept weakly), None for no frame or a ctx without weak references."""
    ctx = None if frame is None else frame.f_locals.get("ctx")
    try:
        weakref.ref(ctx)
    except TypeError:
        return None
    return ctx


def _ctx_frame(names: tuple, depth: int):
    """The nearest frame of a method ``names`` taking ``ctx`` first (an autograd Function's
    ``forward`` / ``backward``) within ``_STACK_LIMIT`` frames above the caller's ``depth``-th
    caller, or None."""
    f = sys._getframe(depth + 1)
    for _ in range(_STACK_LIMIT):
        if f is None:
            return None
        code = f.f_code
        if code.co_name in names and code.co_argcount and code.co_varnames[0] == "ctx":
            return f
        f = f.f_back
    return None


def _identical(a, b) -> bool:
    if a is b:
        return True
    if not (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)):
        return False
    return all(x is y or (not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor) and x == y)
               for x, y in zip(a, b))


def _same_setting(a, b) -> bool:
    """Whether two settings select the same tokens / tiles (a host sync where a keep is another
    tensor: only in a recomputation under a ``with`` entered again)."""
    if _identical(a, b):
        return True
    if not (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if not (x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or x != y:
            return False
    return True


# Pack hooks known to save, not recompute: activation offloading (save_on_cpu, which FSDP's
# offload_wrapper uses). Any other hook may be a checkpoint's.
_SAVING_HOOKS = frozenset({"save_on_cpu.__init__.<locals>.pack_to_cpu"})
_STACK_LIMIT = 64  # frames searched for a Function's forward (a reentrant checkpoint is nearer)


def _forward_checkpoint() -> tuple[bool, Any]:
    """For a forward (called from check_recompute): whether backward may run it again, and the
    checkpoint that would (see check_recompute; None where not recognised). With grad on, when a
    saved-tensors hook is in force (a non-reentrant checkpoint's, or one of unknown purpose; not
    an offloading one); with grad off, inside an autograd Function's ``forward(ctx, ...)``
    (torch's reentrant CheckpointFunction, or another library's), found on the stack. Never in
    inference mode. One hooks query or one stack search."""
    if torch.is_grad_enabled():
        hooks = _saved_tensors_hooks()  # _UNKNOWN where this torch cannot say: noted, as before
        if hooks is None or getattr(hooks, "__qualname__", "") in _SAVING_HOOKS:
            return False, None
        key = _hook_checkpoint(hooks)
        return True, (key if key is not None else _ctx_of(_ctx_frame(("forward", "backward"), 2)))
    if torch.is_inference_mode_enabled():
        return False, None
    # not within _STACK_LIMIT frames: a reentrant checkpoint's is nearer
    f = _ctx_frame(("forward",), 2)
    return f is not None, _ctx_of(f)


# ----------------------------------------------------------------------------- module settings
# A ViT's ek.patch_size lives on its patch embedding (a setting of the model, not of a thread);
# masked_checkpoint snapshots the ones in force so the recomputation runs at the same patch size.
_PATCHED: "weakref.WeakSet" = weakref.WeakSet()


def set_patch(pe, value) -> None:
    """``pe``'s patch setting (``None``: its own patch size)."""
    if value is None:
        pe.__dict__.pop("_effssl_patch", None)
        _PATCHED.discard(pe)
    else:
        pe._effssl_patch = value
        _PATCHED.add(pe)


def patch_snapshot() -> dict:
    return {pe: pe.__dict__["_effssl_patch"] for pe in list(_PATCHED) if "_effssl_patch" in pe.__dict__}


@contextlib.contextmanager
def patch_restored(snapshot: dict) -> Iterator[None]:
    """Every patch setting as in ``snapshot`` inside the ``with`` (those of now restored after)."""
    now = patch_snapshot()
    touched = set(now) | set(snapshot)
    for pe in touched:
        set_patch(pe, snapshot.get(pe))
    try:
        yield
    finally:
        for pe in touched:
            set_patch(pe, now.get(pe))
