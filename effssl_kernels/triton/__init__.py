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
