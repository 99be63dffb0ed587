"""Small argument helpers shared by the Python modules."""
from __future__ import annotations

import copy
import math
import numbers
import operator
import weakref

import torch


def as_pair(size, what: str) -> tuple[int, int]:
    """An int or a pair ``(H, W)`` of positive ints -> ``(H, W)``; ``what`` names it in errors.
    NumPy and 0-d tensor ints count (:func:`as_int`); bools, floats and strings do not."""
    pair = None
    # One int (Python, NumPy, 0-d tensor); never tried on a tuple or list (torch.Size too), whose
    # repr in as_int's message does not trace in Dynamo when it holds SymInts
    if not isinstance(size, (tuple, list)):
        try:
            pair = (as_int(size, what),) * 2
        except TypeError:
            pass
    if pair is None:  # a sequence, NumPy array or tensor of two
        try:
            pair = tuple(as_int(v, what) for v in size)
        except TypeError:
            pass
    if pair is None or len(pair) != 2:
        raise TypeError(f"{what} must be an int or a pair of ints (H, W), got {size!r}")
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"{what} must be positive, got {pair}")
    return pair


def as_int(v, what: str) -> int:
    """``v`` as a Python int (ints, NumPy integers, 0-d integer tensors), else TypeError (bools
    and floats too); ``what`` names it in the message."""
    # a 1-element tensor of any rank converts through __index__; NumPy refuses its arrays, and so
    # do we (as_pair would take [16] as the int 16)
    if not isinstance(v, bool) and not (isinstance(v, torch.Tensor) and v.dim() != 0):
        try:
            return operator.index(v)
        except TypeError:
            pass
    raise TypeError(f"{what} must be an int, got {type(v).__name__} {v!r}")


def conv_out_len(n: int, pad_total: int, k: int, dilation: int, stride: int) -> int:
    """A conv's output length along one axis: ``n`` inputs padded by ``pad_total`` in all."""
    return (n + pad_total - dilation * (k - 1) - 1) // stride + 1


def int_arg(name: str, fn: str, value, minimum: int) -> int:
    """:func:`as_int` of ``value``, also ValueError below ``minimum``; ``fn`` and ``name`` name it."""
    value = as_int(value, f"{fn}: {name}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be at least {minimum}, got {value}")
    return value


def finite_number(name: str, fn: str, value) -> float:
    """``value`` as a finite float: TypeError for a non-number (bool included), ValueError for
    NaN or infinity."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    return float(value)


def to_device_async(t, device):
    """``t.to(device)`` without a host sync: a CPU tensor bound for CUDA goes through pinned memory,
    so the copy is queued like a kernel (from pageable memory it waits for the stream, a sync in
    the middle of a training step). Under torch.compile a plain copy (pin_memory has no fake
    impl). ``None`` (tensor or device) passes through; raises inside CUDA graph capture."""
    if t is None or device is None:
        return t
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu" and not torch.compiler.is_compiling():
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "a CPU tensor (sampled parameters, crop boxes) cannot be copied to the GPU inside CUDA graph "
                "capture: the graph would replay a copy from a reused pinned buffer. Draw on the device or "
                "move them there before capturing."
            )
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def build_for_cache(build):
    """``build()`` for a cache that outlives the call: outside inference mode, so that a first
    call under ``torch.inference_mode()`` (an evaluation) does not store inference tensors,
    which a later training step could never save for backward. In a trace, as it is."""
    # is_compiling first: Dynamo cannot trace is_inference_mode_enabled (a graph break)
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return build()
    return build()


class PicklesGenerator:
    """Mixin: pickles the ``generator`` attribute as its device and state bytes. torch.Generator's
    own pickle carries its state as a tensor, which DataLoader workers started by ``spawn`` or
    ``forkserver`` receive through shared memory and fail to rebuild ("unable to resize file",
    pytorch/pytorch#146828): the worker died before ``worker_init_fn`` could run. One stand-in
    per generator, so objects sharing a generator still share one after a pickle or a deepcopy
    (pickle's memo), rather than each getting a copy that repeats the others' draws."""

    def __getstate__(self):
        state = dict(self.__dict__)
        g = state.get("generator")
        if isinstance(g, torch.Generator):
            state["generator"] = _GeneratorRef.of(g)
        return state

    def __setstate__(self, state):
        # copy.copy hands __getstate__'s dict straight back: the stand-in is the same generator
        g = state.get("generator")
        if isinstance(g, _GeneratorRef):
            state = {**state, "generator": g.generator}
        self.__dict__.update(state)

    def __deepcopy__(self, memo):
        # through the generator itself (torch's deepcopy), so the memo also shares it with plain
        # references to it elsewhere in the copied structure; the stand-in is for pickle only
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new


class _GeneratorRef:
    """Stands for one generator in a pickle; unpickles as a new generator with its state then.

    One per generator while it lives: a pickle's memo holds it for the whole dump, so every
    object of that dump sharing the generator pickles the same stand-in (found by the
    generator's id; the stand-in holds the generator, so the id cannot be reused meanwhile).
    Not a weak dict keyed by the generator: torch.Generator takes no weak reference before
    torch 2.12 (pickling failed on 2.11, the GPU machine's torch, until 2026-12-06)."""

    __slots__ = ("generator", "__weakref__")

    def __init__(self, g: torch.Generator):
        self.generator = g

    @classmethod
    def of(cls, g: torch.Generator) -> "_GeneratorRef":
        key = id(g)
        w = _GENERATOR_REFS.get(key)
        ref = w() if w is not None else None
        if ref is None or ref.generator is not g:
            ref = cls(g)

            def forget(dead, key=key):  # only its own entry: a newer one may hold the key
                if _GENERATOR_REFS.get(key) is dead:
                    del _GENERATOR_REFS[key]

            _GENERATOR_REFS[key] = weakref.ref(ref, forget)
        return ref

    def __reduce__(self):
        g = self.generator
        return _rebuild_generator, (str(g.device), bytes(g.get_state().numpy()))


def _rebuild_generator(device: str, state: bytes) -> torch.Generator:
    g = torch.Generator(device)
    g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return g


_GENERATOR_REFS: "dict[int, weakref.ref[_GeneratorRef]]" = {}
