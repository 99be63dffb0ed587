"""Triton block_match: exact float32 block search with the tie and NaN rules of the C++ kernels.

One program per (sample, block of ``a``). It walks the candidate rectangle (the displacements
whose block lies inside ``b``, derived in int64 as ``block_match_drange`` in
csrc/block_match/block_match.h) in flattened tiles of ``BLOCK_D`` displacements; for each tile it
accumulates the direct ``(a - b)^2`` over the template rows ``(c, ky)`` in a
``[BLOCK_D, BLOCK_KX]`` float32 tile of window loads, sums over ``kx`` and folds the tile into a
running best ``(key, rank)``. The mse is direct, so the winner needs no re-score.
SEMANTICS.md section 1; oracle ``effssl_kernels.reference.block_match_reference``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import device_of, wrap_triton

_INT64_MAX = tl.constexpr(2**63 - 1)
_TEN_LOG10_2 = tl.constexpr(10.0 * math.log10(2.0))  # 10 * log10(x) == _TEN_LOG10_2 * log2(x)
_INT_ARGS = ("C", "H", "W", "Hb", "Wb", "B", "R",
             "sa_n", "sa_c", "sa_h", "sa_w", "sb_n", "sb_c", "sb_h", "sb_w")


@triton.jit
def _tile_displacements(t0, offs_d, total, n_dx, lo_y, lo_x, hi_y, hi_x):
    """(dy, dx) int32 of candidates t0 + offs_d of the row-major rectangle [lo, hi]^2.

    Lanes past the end repeat the last candidate (in bounds, same key and rank: harmless). One
    int64 division per tile; the per-lane ones are int32 (|d| <= r < 2^17).
    """
    q0 = t0 // n_dx
    u = (t0 - q0 * n_dx).to(tl.int32) + offs_d
    n_dx32 = n_dx.to(tl.int32)
    q = u // n_dx32
    dy = (lo_y + q0).to(tl.int32) + q
    dx = lo_x.to(tl.int32) + (u - q * n_dx32)
    tail = (t0 + offs_d) >= total
    dy = tl.where(tail, hi_y.to(tl.int32), dy)
    dx = tl.where(tail, hi_x.to(tl.int32), dx)
    return dy, dx


# No specialisation of the sizes and strides (a value of 1 would become a constexpr): the kernel
# widens them to int64 first, and one compiled variant serves every layout.
@triton.jit(do_not_specialize=_INT_ARGS)
def _block_match_fwd_kernel(
    # pointers
    a_ptr,
    b_ptr,
    centers_ptr,  # int32 [N, Hb, Wb, 2] contiguous, or None
    flip_ptr,  # bool [N] contiguous, or None
    psnr_ptr,  # float32 [N, Hb, Wb] contiguous
    offset_ptr,  # int32 [N, Hb, Wb, 2] contiguous
    # sizes
    C,
    H,
    W,
    Hb,
    Wb,
    B,
    R,
    data_range_sq,
    # strides (elements)
    sa_n,
    sa_c,
    sa_h,
    sa_w,
    sb_n,
    sb_c,
    sb_h,
    sb_w,
    # meta-parameters
    HAS_CENTERS: tl.constexpr,
    HAS_FLIP: tl.constexpr,
    EVEN_K: tl.constexpr,  # B % BLOCK_KX == 0
    BLOCK_D: tl.constexpr,
    BLOCK_KX: tl.constexpr,
):
    # Pointer offsets and the candidate range in int64: n * stride can pass 2^31 and centres may
    # be any int32. Per-lane displacements are int32 (|d| <= r).
    # tl.cast, not .to: Inductor turns integer arguments equal to 1 (a unit stride) into
    # constexprs, which have no .to method.
    pid = tl.program_id(0).to(tl.int64)
    sa_n = tl.cast(sa_n, tl.int64)
    sa_c = tl.cast(sa_c, tl.int64)
    sa_h = tl.cast(sa_h, tl.int64)
    sa_w = tl.cast(sa_w, tl.int64)
    sb_n = tl.cast(sb_n, tl.int64)
    sb_c = tl.cast(sb_c, tl.int64)
    sb_h = tl.cast(sb_h, tl.int64)
    sb_w = tl.cast(sb_w, tl.int64)
    B64 = tl.cast(B, tl.int64)
    R64 = tl.cast(R, tl.int64)
    per_sample = tl.cast(Hb, tl.int64) * Wb
    n = pid // per_sample
    blk = pid - n * per_sample
    bi = blk // Wb
    bj = blk - bi * Wb

    # search centre (top-left in b, in the mirrored-back frame when flipped)
    if HAS_CENTERS:
        cy = tl.load(centers_ptr + 2 * pid).to(tl.int64)
        cx = tl.load(centers_ptr + 2 * pid + 1).to(tl.int64)
    else:
        cy = bi * B64
        cx = bj * B64
    if HAS_FLIP:
        fl = tl.load(flip_ptr + n).to(tl.int64)  # 0 or 1
    else:
        fl = tl.zeros([], tl.int64)

    # candidate rectangle [lo_y, hi_y] x [lo_x, hi_x] (block_match_drange); empty gives 0 tiles
    lo_y = tl.maximum(-cy, -R64)
    hi_y = tl.minimum(H - B64 - cy, R64)
    lo_x = tl.maximum(-cx, -R64)
    hi_x = tl.minimum(W - B64 - cx, R64)
    n_dy = tl.maximum(hi_y - lo_y + 1, 0)
    n_dx = tl.maximum(hi_x - lo_x + 1, 0)
    total = n_dy * n_dx
    side = 2 * R64 + 1

    a_blk = a_ptr + n * sa_n + (bi * B64) * sa_h
    b_smp = b_ptr + n * sb_n
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_KX)

    # running best: key = sum of squares (NaN -> -1), rank as block_match_rank; rank -1 = none yet,
    # so a candidate whose sum overflows to +inf is never taken (as in the reference)
    best_key = tl.full([], float("inf"), tl.float32)
    best_rank = tl.full([], -1, tl.int64)
    for t0 in range(0, total, BLOCK_D):
        dy, dx = _tile_displacements(t0, offs_d, total, n_dx, lo_y, lo_x, hi_y, hi_x)
        y0 = cy + dy
        x0 = cx + dx
        # flip: columns [x0, x0+B) of b mirrored back are columns [W-B-x0, W-x0) of b read
        # backwards, so read b forwards from there and a's row backwards instead
        xs = x0 + fl * (W - B64 - 2 * x0)
        d_off = y0 * sb_h + xs * sb_w
        acc = tl.zeros([BLOCK_D, BLOCK_KX], dtype=tl.float32)
        for kx0 in range(0, B, BLOCK_KX):
            k = kx0 + offs_k
            a_col = bj * B64 + k + fl * (B64 - 1 - 2 * k)
            a_ptrs = a_blk + a_col * sa_w
            b_ptrs = b_smp + (d_off[:, None] + (k * sb_w)[None, :])
            for c in range(0, C):
                for ky in range(0, B):
                    if EVEN_K:  # no mask: B is a multiple of BLOCK_KX
                        a_row = tl.load(a_ptrs).to(tl.float32)
                        b_win = tl.load(b_ptrs).to(tl.float32)
                    else:
                        a_row = tl.load(a_ptrs, mask=k < B, other=0.0).to(tl.float32)
                        b_win = tl.load(b_ptrs, mask=(k < B)[None, :], other=0.0).to(tl.float32)
                    diff = a_row[None, :] - b_win
                    acc += diff * diff
                    a_ptrs += sa_h
                    b_ptrs += sb_h
                a_ptrs += sa_c - B64 * sa_h
                b_ptrs += sb_c - B64 * sb_h
        ssd = tl.sum(acc, axis=1)
        key = tl.where(ssd != ssd, -1.0, ssd)
        # (dy, dx) again rather than kept live through the loop above (registers)
        dy, dx = _tile_displacements(t0, offs_d, total, n_dx, lo_y, lo_x, hi_y, hi_x)
        dy = dy.to(tl.int64)
        dx = dx.to(tl.int64)
        rank = ((tl.abs(dy) + tl.abs(dx)) * side + (dy + R64)) * side + (dx + R64)
        t_key = tl.min(key, axis=0)
        t_rank = tl.min(tl.where(key == t_key, rank, _INT64_MAX), axis=0)
        better = (t_key < best_key) | ((t_key == best_key) & (t_rank < best_rank))
        best_key = tl.where(better, t_key, best_key)
        best_rank = tl.where(better, t_rank, best_rank)

    # epilogue: psnr of the winner (+inf for mse 0, NaN for NaN, -inf and (0, 0) for none)
    found = best_rank >= 0
    # the special keys (0, NaN as -1, none) get their psnr by where, not by log2 of 0 or inf
    ssd = tl.where(found & (best_key > 0.0), best_key, 1.0)
    mse = ssd / (tl.cast(C, tl.float32) * (B64 * B64).to(tl.float32))
    psnr = _TEN_LOG10_2 * tl.log2(data_range_sq / mse)
    psnr = tl.where(best_key == 0.0, float("inf"), psnr)
    psnr = tl.where(best_key < 0.0, float("nan"), psnr)
    psnr = tl.where(found, psnr, float("-inf"))
    out_dy = tl.where(found, (best_rank // side) % side - R64, 0).to(tl.int32)
    out_dx = tl.where(found, best_rank % side - R64, 0).to(tl.int32)
    tl.store(psnr_ptr + pid, psnr)
    tl.store(offset_ptr + 2 * pid, out_dy)
    tl.store(offset_ptr + 2 * pid + 1, out_dx)


def _tile_sizes(block_size: int, search_radius: int, H: int, W: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_KX, num_warps) for one call.

    Tiles of up to 2048 elements with 4 warps: compiled offline for sm_90 (B=32) that takes
    128-168 registers and no spills, where 4096 hits the 255 ceiling (the 64-bit window pointers
    dominate). BLOCK_D is no wider than the candidate rectangle, so small searches (and the
    interpreter) do little wasted work. Not tuned on a GPU yet.
    """
    B, r = block_size, search_radius
    block_kx = min(triton.next_power_of_2(B), 32)
    n_cand = min(2 * r + 1, H - B + 1) * min(2 * r + 1, W - B + 1)
    block_d = max(16, min(triton.next_power_of_2(n_cand), 2048 // block_kx))
    num_warps = max(1, min(4, block_d * block_kx // 512))
    return block_d, block_kx, num_warps


def block_match_triton(
    a: Tensor,
    b: Tensor,
    block_size: int,
    search_radius: int,
    data_range: float,
    centers: Optional[Tensor],
    flip: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """Launch ``_block_match_fwd_kernel``; arguments arrive validated by ``ops.block_match``.

    a, b: [N, C, H, W] float32/float16/bfloat16, any strides (read in place); centers: int32
    [N, Hb, Wb, 2] or None; flip: bool [N] or None. Returns psnr float32 [N, Hb, Wb]
    and offset int32 [N, Hb, Wb, 2] on a's device, as ``block_match_reference``.
    """
    # The kernel takes no strides for centers and flip: it indexes them as dense arrays. The op
    # can be called directly (torch.ops.effssl_kernels._block_match_triton), so copy views here
    # (a no-op for the dense tensors ops.block_match passes).
    centers = None if centers is None else centers.contiguous()
    flip = None if flip is None else flip.contiguous()
    N, C, H, W = a.shape
    B, r = int(block_size), int(search_radius)
    Hb, Wb = H // B, W // B
    psnr = torch.empty((N, Hb, Wb), dtype=torch.float32, device=a.device)
    offset = torch.empty((N, Hb, Wb, 2), dtype=torch.int32, device=a.device)
    n_prog = N * Hb * Wb
    if n_prog == 0:
        return psnr, offset
    if n_prog >= 2**31:
        raise ValueError(f"block_match (triton): {n_prog} blocks exceed one launch grid (2^31 - 1)")
    block_d, block_kx, num_warps = _tile_sizes(B, r, H, W)
    with device_of(a):  # launch on the tensors' GPU, not the current one
        wrap_triton(_block_match_fwd_kernel)[(n_prog,)](
            a, b, centers, flip, psnr, offset,
            C, H, W, Hb, Wb, B, r, float(data_range) * float(data_range),
            *a.stride(), *b.stride(),
            HAS_CENTERS=centers is not None,
            HAS_FLIP=flip is not None,
            EVEN_K=B % block_kx == 0,
            BLOCK_D=block_d,
            BLOCK_KX=block_kx,
            num_warps=num_warps,
        )
    return psnr, offset
