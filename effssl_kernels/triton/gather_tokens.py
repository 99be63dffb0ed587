"""Triton gather_tokens: ``out[n, k] = x[n, keep[n, k]] + pos[keep[n, k]]`` and its backward.

Forward: one program per (sample, block of ``BLOCK_K`` kept rows) x ``BLOCK_D`` columns; loads
the indices once, gathers ``x`` and ``pos`` rows (any strides, int64 offsets), adds in float32
(float64 for a float64 output) and stores one rounding in the output dtype. An index outside
``[0, L)`` is never read: its row of the output is NaN (the op checks indices on the host only
when asked, see ops/gather_tokens).

Backward, deterministic and without atomics: ``torch.sort(keep, stable=True)`` and
``searchsorted`` give, per sample, the run of ``k`` (ascending) that kept each token ``l``.
One program per (chunk of samples, block of ``BLOCK_L`` tokens) x ``BLOCK_D`` columns sums
those runs in float32 (float64 when a float64 tensor is involved) and writes every ``grad_x``
row once (zeros for dropped tokens, so no zero-fill pass); the same sums, added over the
chunk's samples, give partials of ``grad_pos`` that ``torch.sum`` reduces over chunks in a
fixed order. ``grad`` is read once
for both gradients. Indices outside ``[0, L)`` contribute nothing.
SEMANTICS.md section 3; oracle ``effssl_kernels.reference.gather_tokens_reference``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import check_grid, device_of, wrap_triton

POS_CHUNKS = 16  # grad_pos partials: enough programs to fill a GPU, 16 * L * D * 4 bytes extra


@triton.jit
def _gather_tokens_fwd_kernel(
    # pointers
    x_ptr,  # [N, L, D], strides sx_*
    keep_ptr,  # int32/int64 [N, K], strides sk_*
    pos_ptr,  # [L, D], strides sp_*, or None
    out_ptr,  # [N, K, D] contiguous, the promoted dtype
    # sizes
    K,
    L,
    D,
    # strides (elements)
    sx_n,
    sx_l,
    sx_d,
    sk_n,
    sk_k,
    sp_l,
    sp_d,
    # meta-parameters
    HAS_POS: tl.constexpr,
    F64: tl.constexpr,  # add in float64 (a float64 output), else float32
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_kb = tl.cdiv(K, BLOCK_K)
    n = pid // n_kb
    offs_k = (pid - n * n_kb) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    k_in = offs_k < K
    d_in = offs_d < D
    idx = tl.load(keep_ptr + n * sk_n + offs_k * sk_k, mask=k_in, other=0).to(tl.int64)
    # the mask keeps every read inside x and pos whatever keep holds
    valid = k_in & (idx >= 0) & (idx < L)
    m = valid[:, None] & d_in[None, :]
    v = tl.load(x_ptr + n * sx_n + idx[:, None] * sx_l + offs_d[None, :] * sx_d, mask=m, other=0.0)
    ACC = tl.float64 if F64 else tl.float32
    v = v.to(ACC)  # bf16 arithmetic is wrong under the interpreter; float32 on the GPU too
    if HAS_POS:
        p = tl.load(pos_ptr + idx[:, None] * sp_l + offs_d[None, :] * sp_d, mask=m, other=0.0)
        v += p.to(ACC)
    v = tl.where(valid[:, None], v, float("nan"))
    out_ptrs = out_ptr + (n * K + offs_k)[:, None] * D + offs_d[None, :]
    tl.store(out_ptrs, v.to(out_ptr.dtype.element_ty), mask=k_in[:, None] & d_in[None, :])


@triton.jit
def _gather_tokens_bwd_kernel(
    # pointers
    grad_ptr,  # [N, K, D], strides sg_*
    perm_ptr,  # int64 [N, K] contiguous: per sample, k sorted by keep[n, k] (stable)
    bounds_ptr,  # int64 [N, L + 1] contiguous: run of token l is perm[n, bounds[l]:bounds[l+1]]
    gx_ptr,  # [N, L, D] contiguous in x's dtype, or None
    part_ptr,  # float32 (float64 when F64) [chunks, L, D] contiguous, or None
    # sizes
    N,
    K,
    L,
    D,
    samples,  # samples per chunk
    # strides (elements)
    sg_n,
    sg_k,
    sg_d,
    # meta-parameters
    NEED_X: tl.constexpr,
    NEED_POS: tl.constexpr,
    F64: tl.constexpr,  # sum in float64 (grad, x or pos is float64), else float32
    GX_F64: tl.constexpr,  # grad_x is float64
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    l_in = offs_l < L
    d_in = offs_d < D
    ACC = tl.float64 if F64 else tl.float32
    pos_acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
    for i in range(0, samples):
        n = chunk * samples + i
        rows = l_in & (n < N)
        start = tl.load(bounds_ptr + n * (L + 1) + offs_l, mask=rows, other=0)
        count = tl.load(bounds_ptr + n * (L + 1) + offs_l + 1, mask=rows, other=0) - start
        acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
        # usually 0 or 1 rows per token; duplicates add up in ascending k
        for j in range(0, tl.max(count, axis=0)):
            has = j < count
            k = tl.load(perm_ptr + n * K + start + j, mask=has, other=0)
            g_ptrs = grad_ptr + n * sg_n + k[:, None] * sg_k + offs_d[None, :] * sg_d
            acc += tl.load(g_ptrs, mask=has[:, None] & d_in[None, :], other=0.0).to(ACC)
        if NEED_X:
            gx_ptrs = gx_ptr + (n * L + offs_l)[:, None] * D + offs_d[None, :]
            if GX_F64:
                gx = acc.to(tl.float64)
            else:  # a float64 sum reaches 16-bit through float32, as torch's casts do (and the
                # interpreter's direct float64 -> bfloat16 cast is wrong)
                gx = acc.to(tl.float32).to(gx_ptr.dtype.element_ty)
            tl.store(gx_ptrs, gx, mask=rows[:, None] & d_in[None, :])
        if NEED_POS:
            pos_acc += acc
    if NEED_POS:
        p_ptrs = part_ptr + (chunk * L + offs_l)[:, None] * D + offs_d[None, :]
        tl.store(p_ptrs, pos_acc, mask=l_in[:, None] & d_in[None, :])


def _block_d(D: int) -> int:
    """Columns per program: 128 divides ViT widths (384, 768, 1024) exactly. Not tuned on a GPU."""
    return min(128, triton.next_power_of_2(max(D, 1)))


def gather_tokens_fwd(x: Tensor, keep: Tensor, pos: Optional[Tensor]) -> Tensor:
    """Launch ``_gather_tokens_fwd_kernel``; arguments arrive validated by ``ops.gather_tokens``.

    x ``[N, L, D]`` float32/float64/float16/bfloat16 (any strides), keep int32/int64 ``[N, K]``, pos
    ``[L, D]`` or None. Returns ``[N, K, D]`` contiguous in the promoted dtype.
    """
    N, L, D = x.shape
    K = keep.shape[1]
    dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    out = torch.empty((N, K, D), dtype=dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = _block_d(D)
    block_k = min(triton.next_power_of_2(K), max(1, 4096 // block_d))
    grid = check_grid((N * triton.cdiv(K, block_k), triton.cdiv(D, block_d)), "gather_tokens")
    sp = pos.stride() if pos is not None else (0, 0)
    with device_of(x):  # launch on the tensors' GPU, not the current one
        wrap_triton(_gather_tokens_fwd_kernel)[grid](
            x, keep, pos, out,
            K, L, D,
            *x.stride(), *keep.stride(), *sp,
            HAS_POS=pos is not None,
            F64=dtype == torch.float64,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out


def gather_tokens_bwd(
    grad: Tensor,
    keep: Tensor,
    num_tokens: int,
    x_dtype: torch.dtype,
    pos_dtype: torch.dtype,
    need_x: bool,
    need_pos: bool,
) -> tuple[Tensor, Tensor]:
    """Launch ``_gather_tokens_bwd_kernel``: ``(grad_x [N, L, D] in x_dtype, grad_pos [L, D] in
    pos_dtype)``, an empty ``[0]`` tensor for a gradient not asked for. Deterministic."""
    N, K, D = grad.shape
    L = int(num_tokens)
    dev = grad.device
    gx = torch.empty((N, L, D) if need_x else (0,), dtype=x_dtype, device=dev)
    if not need_pos:
        gpos = torch.empty((0,), dtype=pos_dtype, device=dev)
    if (not need_x and not need_pos) or N * L * D == 0 or D == 0:
        if need_pos:
            gpos = torch.zeros((L, D), dtype=pos_dtype, device=dev)
        if need_x:
            gx.zero_()
        return gx, gpos
    # per sample: k in order of keep[n, k] (stable: ascending k among equal tokens), and where
    # the run of each token l starts; indices outside [0, L) sort outside every run
    sorted_keep, perm = torch.sort(keep, dim=1, stable=True)
    tokens = torch.arange(L + 1, device=dev, dtype=keep.dtype).expand(N, L + 1).contiguous()
    bounds = torch.searchsorted(sorted_keep.contiguous(), tokens)
    perm = perm.contiguous()
    acc = torch.float64 if torch.float64 in (grad.dtype, x_dtype, pos_dtype) else torch.float32
    if need_pos:
        chunks = min(N, POS_CHUNKS)
        samples = triton.cdiv(N, chunks)
        chunks = triton.cdiv(N, samples)
        part = torch.empty((chunks, L, D), dtype=acc, device=dev)
    else:
        chunks, samples, part = N, 1, None
    block_d = _block_d(D)
    block_l = min(triton.next_power_of_2(L), max(1, 2048 // block_d))
    grid = check_grid((chunks, triton.cdiv(L, block_l), triton.cdiv(D, block_d)),
                      "gather_tokens backward")
    with device_of(grad):  # launch on the tensors' GPU, not the current one
        wrap_triton(_gather_tokens_bwd_kernel)[grid](
            grad, perm, bounds, gx if need_x else None, part,
            N, K, L, D, samples,
            *grad.stride(),
            NEED_X=need_x,
            NEED_POS=need_pos,
            F64=acc == torch.float64,
            GX_F64=need_x and gx.dtype == torch.float64,
            BLOCK_L=block_l,
            BLOCK_D=block_d,
            num_warps=4,
        )
    if need_pos:
        # fixed-order float32 (float64) reduction over the chunks, one rounding to pos's dtype
        gpos = part.sum(0).to(pos_dtype)
    return gx, gpos
