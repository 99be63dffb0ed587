"""What is available at run time: the compiled extension, its CUDA kernels, Triton.

``EFFSSL_BACKEND`` picks the implementation for CUDA tensors: ``auto`` (default: the CUDA
kernel when built, else Triton), ``cuda``, ``triton`` or ``reference``. CPU tensors run the C++
kernel (``auto``/``cuda``/``cpp``), the reference (``reference``), or Triton only under
``TRITON_INTERPRET=1`` with ``triton``.
"""
from __future__ import annotations

import importlib.util
import os

BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:  # importing _C runs the TORCH_LIBRARY registrations
    from . import _C  # type: ignore[attr-defined]

    HAS_EXT = True
    HAS_CUDA_KERNELS = bool(_C.with_cuda())
    _EXT_ERROR = None
except ImportError as e:  # built without the extension, or a broken build
    _C = None
    HAS_EXT = False
    HAS_CUDA_KERNELS = False
    _EXT_ERROR = str(e)

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

REBUILD_HINT = (
    "Rebuild with `pip install --no-build-isolation -v -e .` from the repository root "
    "(EFFSSL_FORCE_CUDA=1 to insist on CUDA kernels); `python -m effssl_kernels.info` shows what "
    "was built."
)


def backend() -> str:
    """The backend asked for through ``EFFSSL_BACKEND`` (validated)."""
    name = os.environ.get("EFFSSL_BACKEND", "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"EFFSSL_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def require_ext(what: str) -> None:
    if not HAS_EXT:
        raise RuntimeError(
            f"{what} needs the compiled extension effssl_kernels._C, which failed to import "
            f"({_EXT_ERROR}). {REBUILD_HINT} Set EFFSSL_BACKEND=reference to run the slow "
            "plain-PyTorch reference instead."
        )


def choose(device_type: str, cuda_kernel: bool = True) -> str:
    """Resolve the backend for tensors on ``device_type``: 'cpp', 'cuda', 'triton' or 'reference'.

    ``cuda_kernel=False`` for ops whose GPU kernel is Triton only: on CUDA tensors they get
    'triton' whatever EFFSSL_BACKEND names (but 'reference').
    """
    name = backend()
    if name == "reference":
        return "reference"
    if device_type == "cuda" and not cuda_kernel:
        if not HAS_TRITON:
            raise RuntimeError("this op runs on CUDA tensors through Triton, which is not installed")
        return "triton"
    if device_type == "cuda":
        if name == "triton" or (name == "auto" and not HAS_CUDA_KERNELS and HAS_TRITON):
            if not HAS_TRITON:
                raise RuntimeError("EFFSSL_BACKEND=triton but triton is not installed")
            return "triton"
        if not HAS_CUDA_KERNELS:
            if HAS_TRITON:  # asked for 'cuda' (or 'cpp', which has no CUDA meaning) by name
                raise RuntimeError(
                    f"EFFSSL_BACKEND={name}: effssl_kernels was built without CUDA kernels; use "
                    "EFFSSL_BACKEND=auto or triton for the Triton kernels. " + REBUILD_HINT
                )
            raise RuntimeError(
                "effssl_kernels was built without CUDA kernels and Triton is not installed. "
                + REBUILD_HINT
            )
        return "cuda"
    if name == "triton":
        if not (HAS_TRITON and TRITON_INTERPRET):
            raise RuntimeError(
                "EFFSSL_BACKEND=triton runs CPU tensors only under TRITON_INTERPRET=1 "
                "(set it before importing torch)"
            )
        return "triton"
    require_ext("effssl_kernels on CPU tensors")
    return "cpp"


def forward_ad_active() -> bool:
    """Whether a forward-mode AD dual level is open (``forward_ad.dual_level``, ``torch.func.jvp``).
    Reads a private module global; True when it is gone, so callers then check every time."""
    from torch.autograd import forward_ad as fwAD

    return getattr(fwAD, "_current_level", 0) >= 0


def reject_forward_ad(fn: str, *tensors) -> None:
    """NotImplementedError when a tensor carries a forward-mode AD tangent (``forward_ad``,
    ``torch.func.jvp``): the ops' autograd is reverse mode only, and a custom op would drop the
    tangent silently (a zero derivative). Free outside a ``dual_level``."""
    if not forward_ad_active():
        return
    from torch.autograd import forward_ad as fwAD

    for t in tensors:
        if isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"{fn}: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is not supported: "
                "use reverse mode (backward, torch.autograd.grad; torch.func's grad, vjp and "
                "jacrev are not supported either)")


def register_ext_op_pair(name: str, fake, backward_name: str, fake_backward, make_backward,
                         setup_context) -> None:
    """For a C++ op ``effssl_kernels::<name>`` whose backward is the C++ op ``<backward_name>``:
    both fake impls, and the autograd ``make_backward(backward op)`` with ``setup_context``.
    A no-op without the extension (the op does not exist then)."""
    if not HAS_EXT:
        return
    torch.library.register_fake(f"effssl_kernels::{name}")(fake)
    torch.library.register_fake(f"effssl_kernels::{backward_name}")(fake_backward)
    backward_op = getattr(torch.ops.effssl_kernels, backward_name).default
    torch.library.register_autograd(f"effssl_kernels::{name}", make_backward(backward_op),
                                    setup_context=setup_context)


def register_interpreter_fakes(*op_fakes) -> None:
    """Under TRITON_INTERPRET=1 give each ``(triton_op, fake_impl)`` an explicit fake impl and let
    functionalization pass through: there ``wrap_triton`` hands back the raw kernel, which cannot
    see fake tensors (shared/research/toolchain.md). A no-op otherwise."""
    if not TRITON_INTERPRET:
        return
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def passthrough(mode, func, types, args, kwargs):
        return mode.__torch_dispatch__(func, types, args, kwargs)

    for op, fake in op_fakes:
        op.register_fake(fake)
        op.register_torch_dispatch(FunctionalTensorMode, passthrough)


def register_flops(ops, formula) -> None:
    """Give each op (``torch.ops.effssl_kernels.<name>`` packets) a FLOP formula for
    ``torch.utils.flop_counter.FlopCounterMode``, which counts an op it has no formula for as 0
    (a sparse ViT's patch embedding looked free). ``formula(*shapes, out_shape)``: the
    arguments with tensors replaced by their shapes. Once per op (a re-import is a no-op)."""
    from torch.utils import flop_counter

    for op in ops:
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)
