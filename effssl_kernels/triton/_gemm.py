"""What the Triton GEMM kernels share (patch_embed_gather, tile_conv): the dot and its precision."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for a GEMM in ``dtype``: float32 runs TF32 exactly when
    ``torch.backends.cudnn.allow_tf32`` is set (default True), as the ``F.conv2d`` it replaces
    would; half types ignore it."""
    return "tf32" if (dtype != torch.float32 or torch.backends.cudnn.allow_tf32) else "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """The ``UPCAST_DOT`` of :func:`dot_acc` for a GEMM in ``dtype``: bfloat16 under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and dtype == torch.bfloat16


@triton.jit
def dot_acc(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + a @ b`` (float32 accumulator). ``UPCAST_DOT`` is for the interpreter with
    bfloat16, whose dot multiplies raw bits: the operands are widened first (float32 products of
    bfloat16 values are exact)."""
    if UPCAST_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc
