"""Triton halo_gather: each packed tile with a border read from its neighbours, and its backward.

Forward: one program per block of ``BLOCK_R`` padded pixels x ``BLOCK_C`` channels reads the
table (source pixel ``s = t*bh*bw + y*bw + x``, ``S`` = zero, ``S + 1`` = outside), gathers the
channels of each source pixel from the tiles with their strides (int64 offsets) and stores a
channels-last ``[R, C, ph, pw]``. A table entry outside ``[0, S + 2)`` gives NaN, never a read.

Backward, deterministic and without atomics: one program per block of ``BLOCK_S`` source pixels
x ``BLOCK_C`` channels sums, in float32 (float64 for float64), the gradients of the padded pixels
in its run ``order[offsets[s]:offsets[s+1]]`` (the inverse table, ascending), and writes every
source pixel once (channels last). SEMANTICS.md section 2; oracle
``effssl_kernels.reference.halo_gather.halo_gather_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import check_grid, check_int32, device_of, wrap_triton


@triton.jit
def _halo_gather_fwd_kernel(
    x_ptr,  # tiles [T, C, bh, bw], strides s*
    table_ptr,  # int64 [R * ph * pw] contiguous
    out_ptr,  # [R * ph * pw, C] contiguous (channels last)
    R,  # output pixels: R * ph * pw
    C,
    S,  # T * bh * bw
    P,  # bh * bw
    bw,
    s0,
    s1,
    s2,
    s3,
    outside,  # float fill beyond the image (a float32 argument)
    outside_ptr,  # [1] in the tiles' dtype: the fill exactly, read when OUTSIDE_PTR
    OUTSIDE_PTR: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    R = tl.cast(R, tl.int64)
    S = tl.cast(S, tl.int64)
    r_in = offs_r < R
    c_in = offs_c < C
    s = tl.load(table_ptr + offs_r, mask=r_in, other=0)
    real = (s >= 0) & (s < S)
    # S < 2^31 (the launcher checks): the divisions in int32. 64-bit divisions cost Triton 3.8
    # 255 registers and spills at 32 x 128; the pointer arithmetic stays int64.
    ss = tl.where(real, s, 0).to(tl.int32)
    t = ss // P
    p = ss - t * P
    y = p // bw
    x = p - y * bw
    row = t.to(tl.int64) * s0 + y.to(tl.int64) * s2 + x.to(tl.int64) * s3
    ptrs = x_ptr + row[:, None] + offs_c[None, :] * s1
    v = tl.load(ptrs, mask=real[:, None] & c_in[None, :], other=0.0)
    if OUTSIDE_PTR:
        fill = tl.where(s == S + 1, tl.load(outside_ptr), 0.0)
    else:
        fill = tl.where(s == S + 1, outside, 0.0)
    fill = tl.where((s < 0) | (s > S + 1), float("nan"), fill)
    v = tl.where(real[:, None], v, fill[:, None].to(v.dtype))
    out_ptrs = out_ptr + offs_r[:, None] * C + offs_c[None, :]
    tl.store(out_ptrs, v.to(out_ptr.dtype.element_ty), mask=r_in[:, None] & c_in[None, :])


@triton.jit
def _halo_gather_bwd_kernel(
    g_ptr,  # grad [R, C, ph, pw], strides g*
    order_ptr,  # int64 [M]: output pixels r*ph*pw + u*pw + v sorted by source
    offsets_ptr,  # int64 [S + 1]
    out_ptr,  # [S, C] contiguous (channels last grad of the tiles)
    S,
    C,
    M,  # entries of order
    Q,  # padded pixels R * ph * pw
    PP,  # ph * pw
    pw,
    g0,
    g1,
    g2,
    g3,
    ACC_F64: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_in = offs_s < S
    c_in = offs_c < C
    lo = tl.load(offsets_ptr + offs_s, mask=s_in, other=0)
    cnt = tl.load(offsets_ptr + offs_s + 1, mask=s_in, other=0) - lo
    # order / offsets are ours (TileIndex.halo_inverse); made-up ones give NaN, never a wild read
    bad = (lo < 0) | (cnt < 0) | (lo + cnt > M)
    cnt = tl.where(bad, 0, cnt)
    if ACC_F64:
        acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    # 1 to 4 readers per pixel for a one-pixel halo (itself, then its neighbours' borders)
    for j in range(0, tl.max(cnt, axis=0)):
        has = j < cnt
        # q < 2^31 (the launcher checks): int32 divisions, int64 pointer arithmetic
        q64 = tl.load(order_ptr + lo + j, mask=has, other=0)
        # no `~` on a boolean block: Triton 3.3's interpreter cannot invert int1
        q_bad = (q64 < 0) | (q64 >= Q)
        bad = bad | (has & q_bad)
        has = has & (q64 >= 0) & (q64 < Q)
        q = q64.to(tl.int32)
        t = q // PP
        rem = q - t * PP
        u = rem // pw
        v = rem - u * pw
        row = t.to(tl.int64) * g0 + u.to(tl.int64) * g2 + v.to(tl.int64) * g3
        ptrs = g_ptr + row[:, None] + offs_c[None, :] * g1
        acc += tl.load(ptrs, mask=has[:, None] & c_in[None, :], other=0.0).to(acc.dtype)
    acc = tl.where(bad[:, None], float("nan"), acc)
    out_ptrs = out_ptr + offs_s[:, None] * C + offs_c[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=s_in[:, None] & c_in[None, :])


def _block_c(C: int) -> int:
    return max(16, min(128, triton.next_power_of_2(max(C, 1))))


def halo_gather_fwd(tiles: Tensor, table: Tensor, outside: float) -> Tensor:
    T, C, bh, bw = tiles.shape
    n_out, ph, pw = table.shape
    out = torch.empty((n_out, C, ph, pw), dtype=tiles.dtype, device=tiles.device,
                      memory_format=torch.channels_last)
    R = n_out * ph * pw
    if out.numel() == 0:
        return out
    check_int32("halo_gather", {"tile pixels": T * bh * bw})  # split in int32 by the kernel
    BLOCK_R, BLOCK_C = 32, _block_c(C)
    grid = check_grid((triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C)), "halo_gather")
    # Triton passes a Python float as float32: a float64 fill that float32 cannot hold exactly
    # goes through memory instead (0 and -inf, the fills the layers use, never do)
    outside = float(outside)
    exact = tiles.dtype != torch.float64 or outside != outside or float(torch.tensor(outside).float()) == outside
    fill = tiles if exact else torch.full((1,), outside, dtype=tiles.dtype, device=tiles.device)
    with device_of(tiles):  # launch on the tensors' GPU, not the current one
        wrap_triton(_halo_gather_fwd_kernel)[grid](
            tiles, table.contiguous(), out, R, C, T * bh * bw, bh * bw, bw, *tiles.stride(),
            outside, fill, OUTSIDE_PTR=not exact, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return out


def halo_gather_bwd(grad: Tensor, order: Tensor, offsets: Tensor, T: int, bh: int,
                    bw: int) -> Tensor:
    _, C, ph, pw = grad.shape
    out = torch.empty((T, C, bh, bw), dtype=grad.dtype, device=grad.device,
                      memory_format=torch.channels_last)
    S = T * bh * bw
    if out.numel() == 0:
        return out
    check_int32("halo_gather backward", {"padded pixels": grad.shape[0] * ph * pw})
    BLOCK_C = _block_c(C)
    # at most 2048 elements a program: 32 x 128 spilled with Triton 3.8 (255 registers)
    BLOCK_S = 32 if BLOCK_C <= 64 else 16
    grid = check_grid((triton.cdiv(S, BLOCK_S), triton.cdiv(C, BLOCK_C)), "halo_gather backward")
    with device_of(grad):
        wrap_triton(_halo_gather_bwd_kernel)[grid](
            grad, order.contiguous(), offsets.contiguous(), out, S, C, order.numel(), grad.shape[0] * ph * pw,
            ph * pw, pw, *grad.stride(),
            ACC_F64=grad.dtype == torch.float64, BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C)
    return out
