"""Triton tile_conv: a stride-1 convolution over packed tiles as an implicit GEMM, halo included.

``out[t, :, y, x] = sum_{ky, kx} W[:, :, ky, kx] @ src(t, y + ky*dh, x + kx*dw)`` where ``src``
reads the halo'd tile through ``table`` (``TileIndex.halo_table``: padded pixel -> source pixel of
the packed map, or a sentinel >= ``T * bh * bw`` for zeros). It is ``F.conv2d`` (VALID, stride 1)
of ``halo_gather(tiles, table)`` without writing the halo'd copy: the halo'd tile is ~1.6x the
tile on 8x8 tiles and 4x on 2x2 tiles (ResNet-50's layer 3 at block 32), traffic that the
cuDNN-on-tiles path pays on every 3x3 conv, forward and backward.

Forward (``_tile_conv_fwd_kernel``): one program per ``BLOCK_M`` output pixels (rows ``m`` of
the channels-last output, ``m = (t * bh + y) * bw + x``) x ``BLOCK_N`` output channels. For each
tap, each row looks its source pixel up in the table once, then the K-loop gathers
``[BLOCK_M, BLOCK_K]`` channel slices (contiguous for channels-last tiles) and feeds ``tl.dot``
with a float32 accumulator; the weight is pre-arranged as ``[kh * kw * C, C_out]``.
The input gradient of a stride-1 conv is the same kernel on the output gradient, with the kernel
flipped and transposed and the halo mirrored (before <-> after): ops/tile_conv.py.

Weight gradient (``_tile_conv_wgrad_kernel``): ``dW[tap] = G^T @ X_tap`` reduces over all output
pixels. One program per (``BLOCK_N`` output channels, tap and ``BLOCK_C`` input channels, split
of the rows); each writes a float32 partial that ``torch.sum`` adds over the splits in a fixed
order (deterministic, no atomics).

float32 runs TF32 in ``tl.dot`` when ``torch.backends.cudnn.allow_tf32`` is set (as cuDNN's
conv would); under the interpreter the dot is exact (bfloat16 widened first). Tile sizes come
from sm_90 register reports, not timings: not yet run on a GPU.
SEMANTICS.md section 2; oracle ``effssl_kernels.reference.tile_conv_reference``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import check_grid, check_int32, device_of, wrap_triton
from ._gemm import dot_acc, input_precision, upcast_dot

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _widen(s_t, s_c, s_y, s_x, C):
    """Strides as int64 (offsets pass 2^31 on large maps), C as int32. tl.cast, not .to: a
    specialised argument equal to 1 is a constexpr, which has no .to."""
    return tl.cast(s_t, tl.int64), tl.cast(s_c, tl.int64), tl.cast(s_y, tl.int64), tl.cast(s_x, tl.int64), \
        tl.cast(C, tl.int32)


@triton.jit
def _source_rows(table_ptr, rows, row_ok, tap, BH, BW, PH, PW, M, s_t, s_y, s_x,
                 KW: tl.constexpr, DH, DW):
    """(ok, int64 offset) of the pixel that output rows ``rows`` read at ``tap``: the table entry
    of padded pixel ``(y + ky*dh, x + kx*dw)`` of their tile, split into (tile, y, x). Stride 1:
    source and output tiles are the same ``BH x BW`` pixels, ``M`` of them in all, so a source
    pixel splits like a row and ``M`` is the table's first sentinel. int32 index math (the
    launcher bounds every quantity); ``ok`` is False for zeros (sentinels)."""
    bp = BH * BW
    t = rows // bp
    r = rows - t * bp
    y = r // BW
    x = r - y * BW
    ky = tap // KW
    kx = tap - ky * KW
    src = tl.load(table_ptr + t * (PH * PW) + (y + ky * DH) * PW + (x + kx * DW), mask=row_ok, other=M)
    ok = row_ok & (src >= 0) & (src < M)
    src = tl.where(ok, src, 0).to(tl.int32)
    st = src // bp
    sr = src - st * bp
    sy = sr // BW
    sx = sr - sy * BW
    return ok, st.to(tl.int64) * s_t + sy.to(tl.int64) * s_y + sx.to(tl.int64) * s_x


# Integer arguments are specialised as Triton does by default (== 1 becomes a constant, % 16 == 0
# a divisibility hint): channels-last tiles with C % 16 == 0 then load 16-byte vectors along the
# channels. With the strides unspecialised (do_not_specialize) sm_90 ptxas reported 255
# registers for every tile size (scalar 2-byte gathers); specialised, 112 (bf16, 128 x 64 x 32).
@triton.jit
def _tile_conv_fwd_kernel(
    x_ptr,  # packed tiles [T, C, BH', BW'] any strides (the source map)
    w_ptr,  # [KH * KW * C, CO] contiguous, x's dtype
    b_ptr,  # [CO] or None
    table_ptr,  # int64 [T, PH, PW] contiguous: source pixel or a sentinel >= M
    out_ptr,  # [M, CO] contiguous = channels-last [T, CO, BH, BW]
    M,  # T * BH * BW output pixels (= source pixels)
    C,
    CO,
    PH,
    PW,
    BH,  # output tile (= source tile: stride 1)
    BW,
    s_t,
    s_c,
    s_y,
    s_x,
    DH,
    DW,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # only under TRITON_INTERPRET=1 with bfloat16
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    s_t, s_c, s_y, s_x, C = _widen(s_t, s_c, s_y, s_x, C)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < CO
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tap in range(0, KH * KW):
        ok, off = _source_rows(table_ptr, rows, row_ok, tap, BH, BW, PH, PW, M, s_t, s_y, s_x, KW, DH, DW)
        a_rows = x_ptr + off
        for c0 in range(0, C, BLOCK_K):
            ck = c0 + tl.arange(0, BLOCK_K)
            c_ok = ck < C
            a = tl.load(a_rows[:, None] + ck[None, :].to(tl.int64) * s_c, mask=ok[:, None] & c_ok[None, :],
                        other=0.0)
            b = tl.load(w_ptr + (tap * C + ck)[:, None].to(tl.int64) * CO + cols[None, :],
                        mask=c_ok[:, None] & col_ok[None, :], other=0.0)
            acc = dot_acc(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_rows = out_ptr + rows.to(tl.int64) * CO
    tl.store(out_rows[:, None] + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _tile_conv_wgrad_kernel(
    g_ptr,  # [M, CO] contiguous: channels-last output gradient
    x_ptr,  # packed tiles [T, C, BH, BW] any strides
    table_ptr,
    part_ptr,  # float32 [SPLIT, KH * KW, CO, C] contiguous
    M,
    C,
    CO,
    PH,
    PW,
    BH,
    BW,
    s_t,
    s_c,
    s_y,
    s_x,
    DH,
    DW,
    rows_per_split,  # a multiple of BLOCK_M
    KH: tl.constexpr,
    KW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_kc = tl.program_id(1)
    pid_s = tl.program_id(2)
    s_t, s_c, s_y, s_x, C = _widen(s_t, s_c, s_y, s_x, C)
    n_cb = tl.cdiv(C, BLOCK_C)
    tap = pid_kc // n_cb
    ck = (pid_kc - tap * n_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = ck < C
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < CO
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        ok, off = _source_rows(table_ptr, rows, row_ok, tap, BH, BW, PH, PW, M, s_t, s_y, s_x, KW, DH, DW)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * CO + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0)
        a = tl.load(x_ptr + off[:, None] + ck[None, :].to(tl.int64) * s_c, mask=ok[:, None] & c_ok[None, :],
                    other=0.0)
        acc = dot_acc(tl.trans(g), a, acc, INPUT_PRECISION, UPCAST_DOT)
    p_ptrs = part_ptr + ((pid_s * (KH * KW) + tap) * CO + cols[:, None]).to(tl.int64) * C + ck[None, :]
    tl.store(p_ptrs, acc, mask=col_ok[:, None] & c_ok[None, :])


# Index math is int32 where these bound it; the headroom covers the padding of the last tiles.
_INT32_LIMIT = 2**31 - 2**16


def _fwd_tiles(M: int, CO: int, C: int, ieee: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): small under the interpreter; on a GPU
    128 x 64 x 32 with 4 warps and 3 stages (1 for float32 IEEE, which spilled 16-36 bytes at 2
    or 3 with unspecialised strides).
    sm_90 ptxas, channels-last tiles with C % 16 == 0: 112 registers bf16, 168 float32 TF32, 192
    float32 IEEE, no spills (test_triton_gpu_ir.py). Not tuned on a GPU yet."""
    if _INTERPRET:
        return 16, 16, 16, 1, 1
    bm = 128 if M >= 128 else max(16, triton.next_power_of_2(M))
    bn = 64 if CO >= 64 else max(16, triton.next_power_of_2(CO))
    bk = 32 if C >= 32 else 16
    return bm, bn, bk, 4, 1 if ieee else 3


def _wgrad_tiles(C: int, CO: int, ieee: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_C, num_warps, num_stages) of the weight gradient: 64 x 64 x 64,
    4 warps, 3 stages on a GPU (80-106 registers on sm_90, no spills); 8 warps for float32 IEEE,
    which spilled 920 bytes at 4 with unspecialised strides."""
    if _INTERPRET:
        return 16, 16, 16, 1, 1
    bn = 64 if CO >= 64 else max(16, triton.next_power_of_2(CO))
    bc = 64 if C >= 64 else max(16, triton.next_power_of_2(C))
    return 64, bn, bc, 8 if ieee else 4, 3


def _geometry(tiles: Tensor, table: Tensor, kernel: tuple[int, int]) -> dict:
    """Sizes the kernels take. The output tiles are the source tiles (``ops.tile_conv`` checks
    ``table`` is ``[T, bh + reach, bw + reach]``), so the ``M`` output rows are the source pixels.
    The weight rows ``tap * C + c`` are int32 too."""
    T, C, bh, bw = tiles.shape
    _, PH, PW = table.shape
    M = T * bh * bw
    check_int32("tile_conv (Triton)", {"T*ph*pw": T * PH * PW, "T*bh*bw": M, "C*kh*kw": C * kernel[0] * kernel[1]},
                _INT32_LIMIT, "2^31 - 2^16")
    return dict(M=M, C=C, PH=PH, PW=PW, BH=bh, BW=bw)


def tile_conv_fwd(tiles: Tensor, weight: Tensor, bias: Optional[Tensor], table: Tensor,
                  dilation: tuple[int, int]) -> Tensor:
    """Launch ``_tile_conv_fwd_kernel``; arguments arrive validated by ``ops.tile_conv``.

    tiles ``[T, C, bh, bw]`` (any strides), weight ``[CO, C, kh, kw]`` and bias ``[CO]`` in its
    dtype, table int64 ``[T, bh + dh*(kh-1), bw + dw*(kw-1)]``. Returns ``[T, CO, bh, bw]``
    channels last."""
    CO, _, kh, kw = weight.shape
    g = _geometry(tiles, table, (kh, kw))
    out = torch.empty((tiles.shape[0], CO, g["BH"], g["BW"]), dtype=tiles.dtype, device=tiles.device,
                      memory_format=torch.channels_last)
    if g["M"] == 0 or CO == 0:
        return out
    if g["C"] == 0:
        return out.zero_() if bias is None else out.copy_(bias.view(1, CO, 1, 1).expand_as(out))
    w = weight.permute(2, 3, 1, 0).contiguous()  # [kh, kw, C, CO]
    precision = input_precision(tiles.dtype)
    bm, bn, bk, warps, stages = _fwd_tiles(g["M"], CO, g["C"], precision == "ieee")
    grid = check_grid((triton.cdiv(g["M"], bm), triton.cdiv(CO, bn)), "tile_conv")
    with device_of(tiles):  # launch on the tensors' GPU, not the current one
        wrap_triton(_tile_conv_fwd_kernel)[grid](
            tiles, w, None if bias is None else bias.contiguous(), table.contiguous(), out,
            g["M"], g["C"], CO, g["PH"], g["PW"], g["BH"], g["BW"],
            *tiles.stride(), dilation[0], dilation[1],
            KH=kh, KW=kw, HAS_BIAS=bias is not None,
            INPUT_PRECISION=precision,
            UPCAST_DOT=upcast_dot(tiles.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )
    return out


def _num_splits(programs: int, row_blocks: int) -> int:
    """Row splits of the weight gradient: enough programs for ~4 waves of 132 SMs, each split
    at least 8 row blocks long (its float32 partial is written once)."""
    want = max(1, -(-528 // max(programs, 1)))
    return max(1, min(want, row_blocks // 8))


def tile_conv_wgrad(grad: Tensor, tiles: Tensor, table: Tensor, kernel: tuple[int, int],
                    dilation: tuple[int, int]) -> Tensor:
    """Launch ``_tile_conv_wgrad_kernel``: ``[CO, C, kh, kw]`` float32 weight gradient of
    :func:`tile_conv_fwd` for output gradient ``grad [T, CO, bh, bw]``."""
    kh, kw = kernel
    CO = grad.shape[1]
    g = _geometry(tiles, table, kernel)
    C = g["C"]
    if g["M"] == 0 or C == 0 or CO == 0:
        return torch.zeros((CO, C, kh, kw), dtype=torch.float32, device=tiles.device)
    go = grad.to(tiles.dtype).contiguous(memory_format=torch.channels_last)  # rows [M, CO]
    precision = input_precision(tiles.dtype)
    bm, bn, bc, warps, stages = _wgrad_tiles(C, CO, precision == "ieee")
    programs = triton.cdiv(CO, bn) * kh * kw * triton.cdiv(C, bc)
    row_blocks = triton.cdiv(g["M"], bm)
    splits = _num_splits(programs, row_blocks)
    rows_per_split = triton.cdiv(row_blocks, splits) * bm
    splits = triton.cdiv(g["M"], rows_per_split)
    # the kernel's partial rows (split * kh * kw + tap) * CO + co are int32
    check_int32("tile_conv weight gradient (Triton)", {"splits*kh*kw*CO": splits * kh * kw * CO})
    part = torch.empty((splits, kh * kw, CO, C), dtype=torch.float32, device=tiles.device)
    grid = check_grid((triton.cdiv(CO, bn), kh * kw * triton.cdiv(C, bc), splits), "tile_conv weight gradient")
    with device_of(tiles):
        wrap_triton(_tile_conv_wgrad_kernel)[grid](
            go, tiles, table.contiguous(), part,
            g["M"], C, CO, g["PH"], g["PW"], g["BH"], g["BW"],
            *tiles.stride(), dilation[0], dilation[1], rows_per_split,
            KH=kh, KW=kw,
            INPUT_PRECISION=precision,
            UPCAST_DOT=upcast_dot(tiles.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc, num_warps=warps, num_stages=stages,
        )
    # fixed-order float32 reduction over the splits
    return part.sum(0).view(kh, kw, CO, C).permute(2, 3, 0, 1).contiguous()
