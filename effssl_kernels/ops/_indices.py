"""One policy for range-checking token indices (``keep``) on every token op (and, lighter, for
tile_conv's tables: see :func:`check_table_range`).

- CPU tensors: a host check, ValueError (free: no device to wait for).
- CUDA tensors, eager: ``torch._assert_async``, a device-side assert like torch's own indexing,
  so a bad index stops the program without a host synchronisation per call. With
  ``EFFSSL_CHECK_INDICES=1`` the check runs on the host instead (one sync, a ValueError that
  names the value): use it while debugging.
- Inside ``torch.compile``: no check; the Triton kernels never read out of bounds and write NaN
  rows for a bad index, so a bad index is never a silent wrong answer.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor


def check_keep_range(keep: Tensor, L: int, op: str) -> None:
    if torch.compiler.is_compiling() or keep.numel() == 0:
        return
    if keep.device.type == "cpu" or os.environ.get("EFFSSL_CHECK_INDICES", "0") == "1":
        bad = (keep < 0) | (keep >= L)
        if bool(bad.any()):
            raise ValueError(f"{op}: keep holds {keep[bad][0].item()}, outside [0, {L}) (L = number of patch tokens)")
    elif keep.is_cuda:
        torch._assert_async(((keep >= 0) & (keep < L)).all(), f"{op}: keep values must be in [0, {L})")


def check_table_range(table: Tensor, hi: int, op: str) -> None:
    """A tile table's entries must lie in ``[0, hi)`` (source pixels and the sentinels). Checked on
    the host for CPU tensors, and for CUDA ones with ``EFFSSL_CHECK_INDICES=1`` only: the tables
    the package builds are right by construction, and a device check on every layer's call would
    read each table twice more. Unchecked, a CUDA kernel reads an entry out of range as a zero
    (never out of bounds)."""
    if torch.compiler.is_compiling() or table.numel() == 0:
        return
    if table.device.type == "cpu" or os.environ.get("EFFSSL_CHECK_INDICES", "0") == "1":
        bad = (table < 0) | (table >= hi)
        if bool(bad.any()):
            raise ValueError(f"{op}: the table holds {table[bad][0].item()}, outside [0, {hi}) (source "
                             f"pixels, then the zero and outside sentinels)")
