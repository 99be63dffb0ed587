"""Triton kernels and their launchers, one module per op (``effssl_kernels/triton/<op>.py``).

Only ``effssl_kernels/ops`` calls these, through ``torch.library.triton_op``; import a module
here lazily (importing triton costs ~2.5 s).
"""
import contextlib

import torch


def device_of(t: torch.Tensor):
    """Context for a launch: Triton launches on the *current* CUDA device, which need not be the
    tensors' (views on cuda:1 while cuda:0 is current). A no-op for CPU tensors (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, so that ``torch.compile`` sees what a launch reads
    and writes; the kernel itself under TRITON_INTERPRET=1, where ``@triton.jit`` gives an
    InterpretedFunction that torch before 2.14 refuses ("wrap_triton only works on functions
    annotated with triton.jit") and nothing is traced for the interpreter anyway (torch 2.14
    hands it back the same way)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    inner = kernel.fn if isinstance(kernel, Autotuner) else kernel  # an autotuner of the interpreter
    if isinstance(inner, JITFunction):
        return torch.library.wrap_triton(kernel)
    return kernel


def check_grid(grid: tuple, op: str) -> tuple:
    """``grid`` if CUDA can launch it, else a ValueError naming ``op``: axis 0 holds up to 2^31 - 1
    programs, axes 1 and 2 up to 65535 (a launch past them fails with an opaque "invalid
    argument"; the interpreter has no limit, so tests on the CPU would never see it)."""
    limits = (2**31 - 1, 65535, 65535)
    for axis, (n, lim) in enumerate(zip(grid, limits)):
        if n > lim:
            raise ValueError(f"{op}: the Triton launch needs {n} programs on grid axis {axis} "
                             f"(CUDA allows {lim}); the input is too large for this kernel")
    return grid


def check_int32(op: str, sizes: dict, limit: int = 2**31, limit_text: str = "2^31") -> None:
    """A ValueError naming ``op`` unless every value of ``sizes`` ({name: value}, quantities a
    kernel indexes in int32) is below ``limit``."""
    for name, v in sizes.items():
        if v >= limit:
            raise ValueError(f"{op}: {name} = {v} must be below {limit_text} (the kernel indexes it in int32)")
