"""Triton patch_embed_gather: an implicit-im2col GEMM over the kept patches only.

Forward (``_patch_embed_gather_fwd_kernel``): one program per tile of ``BLOCK_M`` kept patches
(rows ``m = n * K + k`` of the output) by ``BLOCK_N`` embedding channels. The K-loop runs over
the ``C * p * p`` patch pixels in the order ``(c, ky, kx)`` of ``weight.reshape(D, -1)`` and loads
each row's pixels straight from the image at addresses computed from ``keep`` (any strides:
NCHW, channels_last, slices), converts them to the GEMM dtype (the weight's) and feeds
``tl.dot`` with a float32 accumulator (float64 inputs take an FMA loop instead). The epilogue adds
the bias, rounds to the GEMM dtype (as the conv output of timm's path is rounded), adds
``pos_embed[keep]`` in float32 (float64 for float64) and stores in the output dtype.
float32 inputs use TF32 in ``tl.dot`` exactly when ``torch.backends.cudnn.allow_tf32`` is set
(default True), as the ``F.conv2d`` of timm's path does; under the interpreter the dot is exact.
A ``keep`` value outside ``[0, L)`` reads nothing and gives a NaN row (the op also checks eagerly).

Backward helpers: ``gather_patches_triton`` (``_gather_patches_kernel``: the kept patches as
``[N, K, C*p*p]`` for the weight-gradient GEMM, which torch.mm then runs: cuBLAS is already
optimal there). The image and pos_embed gradients are plain torch (``_scatter_rows`` and
``_scatter_patches_torch`` in ops/patch_embed_gather.py: ``index_put(accumulate=True)`` into a
float32 buffer).

Tile sizes (``_fwd_tiles``: 128 x 64 x 32, 8 warps, 3 stages) are chosen so that sm_90 ptxas
reports no register spills for any dtype; not yet timed on a GPU.
SEMANTICS.md section 3; oracle ``effssl_kernels.reference.patch_embed_gather_reference``.
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
def _patch_rows(keep_ptr, rows, M, K, L, Wp, P, s_n, s_h, s_w):
    """(valid, l, image offset of each row's patch top-left) for output rows ``rows``.

    Index arithmetic is int32 (the launcher bounds M and L); only the offset is int64."""
    row_ok = rows < M
    l = tl.load(keep_ptr + rows, mask=row_ok, other=0)
    valid = row_ok & (l >= 0) & (l < L)
    l = tl.where(valid, l, 0).to(tl.int32)  # in [0, L) now
    n = rows // K
    py = l // Wp
    px = l - py * Wp
    return valid, l, n.to(tl.int64) * s_n + (py * P).to(tl.int64) * s_h + (px * P).to(tl.int64) * s_w


@triton.jit
def _patch_cols(j, P, s_c, s_h, s_w):
    """Image offset (int64) of patch column j = (c, ky, kx).

    The divisions run in int32 (j < C*p*p < 2^31, checked by the launcher): in int64 they are
    long instruction sequences, every K step, and made the forward spill."""
    pp = P * P
    c = j // pp
    r = j - c * pp
    ky = r // P
    kx = r - ky * P
    return c.to(tl.int64) * s_c + ky.to(tl.int64) * s_h + kx.to(tl.int64) * s_w


# Integer arguments are specialised as Triton does by default (a value of 1 becomes a constant, a
# multiple of 16 a divisibility hint; a few compiled variants): for a contiguous image, patch
# 16 and ViT widths, sm_90 ptxas then reports 102 registers (bf16, 128 x 64 x 32, 8 warps)
# against 244 with every size and stride a plain runtime value (do_not_specialize, as this kernel
# had). Index math is int32 where the launcher bounds it (rows, columns, the (c, ky, kx)
# decomposition, pos_embed offsets) and int64 only for image and output offsets (n * s_n passes
# 2^31 for large batches): int64 arithmetic over the whole gather tile, 64-bit divisions in every
# K step, and 64-bit pos_embed offsets in the epilogue made this kernel spill on sm_90.
@triton.jit
def _patch_embed_gather_fwd_kernel(
    # pointers
    img_ptr,  # [N, C, H, W] any strides, any float dtype
    w_ptr,  # [D, C*p*p] contiguous, GEMM dtype
    b_ptr,  # [D] GEMM dtype, or None
    keep_ptr,  # int32/int64 [N*K] contiguous
    pos_ptr,  # [L, D] strided, or None
    out_ptr,  # [N*K, D] contiguous, output dtype
    # sizes
    M,  # N * K
    K,
    D,
    KD,  # C * p * p
    L,
    Wp,
    P,
    # strides (elements)
    s_n,
    s_c,
    s_h,
    s_w,
    s_pl,
    s_pd,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    FP64: tl.constexpr,  # GEMM dtype is float64: FMA loop, float64 accumulator
    ADD_FP64: tl.constexpr,  # output is float64: the pos add runs in float64
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # only under TRITON_INTERPRET=1 with bfloat16
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # int32 indices (bounded by the launcher's check_int32); int64 image and output offsets
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # tl.cast, not .to: Inductor turns integer arguments equal to 1 into constexprs (no .to)
    s_n = tl.cast(s_n, tl.int64)
    s_c = tl.cast(s_c, tl.int64)
    s_h = tl.cast(s_h, tl.int64)
    s_w = tl.cast(s_w, tl.int64)
    s_pl = tl.cast(s_pl, tl.int32)
    s_pd = tl.cast(s_pd, tl.int32)
    P = tl.cast(P, tl.int32)
    KD = tl.cast(KD, tl.int32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    valid, l, row_off = _patch_rows(keep_ptr, rows, M, K, L, Wp, P, s_n, s_h, s_w)
    a_rows = img_ptr + row_off  # [BLOCK_M] pointers to each kept patch's top-left pixel
    gemm_ty = w_ptr.dtype.element_ty

    if FP64:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j0 in range(0, KD, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        j_ok = j < KD
        col_off = _patch_cols(j, P, s_c, s_h, s_w)
        # the kept patches' pixels, gathered from the image and rounded to the GEMM dtype
        a = tl.load(a_rows[:, None] + col_off[None, :],
                    mask=valid[:, None] & j_ok[None, :], other=0.0).to(gemm_ty)
        b = tl.load(w_ptr + (cols[None, :] * KD + j[:, None]), mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        if FP64:
            acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        else:
            acc = dot_acc(a, b, acc, INPUT_PRECISION, UPCAST_DOT)

    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(acc.dtype)[None, :]
    # rounded to the GEMM dtype, as timm's conv output, but held in the accumulator's type: the
    # NaN select below needs a float32/64 operand (the interpreter has no bf16 constants)
    y = acc.to(gemm_ty).to(acc.dtype)
    if HAS_POS:
        pos = tl.load(pos_ptr + (l[:, None] * s_pl + cols[None, :] * s_pd),
                      mask=valid[:, None] & col_ok[None, :], other=0.0)
        if ADD_FP64:
            y = y.to(tl.float64) + pos.to(tl.float64)
        else:
            y = y.to(tl.float32) + pos.to(tl.float32)
    y = tl.where(valid[:, None], y, float("nan"))  # keep out of range: NaN, never a wild read
    out_ty = out_ptr.dtype.element_ty
    out_rows = out_ptr + rows.to(tl.int64) * D
    tl.store(out_rows[:, None] + cols[None, :], y.to(out_ty),
             mask=(rows < M)[:, None] & col_ok[None, :])


@triton.jit
def _gather_patches_kernel(
    # pointers
    img_ptr,  # [N, C, H, W] any strides
    keep_ptr,  # int32/int64 [N*K] contiguous
    out_ptr,  # [N*K, C*p*p] contiguous
    # sizes
    M,
    K,
    KD,
    L,
    Wp,
    P,
    # strides (elements)
    s_n,
    s_c,
    s_h,
    s_w,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # As in the forward: row and column indices are int32, image and output offsets int64.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    # tl.cast, not .to: Inductor turns integer arguments equal to 1 into constexprs (no .to)
    s_n = tl.cast(s_n, tl.int64)
    s_c = tl.cast(s_c, tl.int64)
    s_h = tl.cast(s_h, tl.int64)
    s_w = tl.cast(s_w, tl.int64)
    P = tl.cast(P, tl.int32)
    KD = tl.cast(KD, tl.int32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = j < KD
    valid, l, row_off = _patch_rows(keep_ptr, rows, M, K, L, Wp, P, s_n, s_h, s_w)
    col_off = _patch_cols(j, P, s_c, s_h, s_w)
    # rows of out-of-range indices stay 0: only the backward gathers, after the forward checked
    x = tl.load((img_ptr + row_off)[:, None] + col_off[None, :], mask=valid[:, None] & j_ok[None, :], other=0.0)
    out_rows = out_ptr + rows.to(tl.int64) * KD
    tl.store(out_rows[:, None] + j[None, :], x.to(out_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & j_ok[None, :])


def _fwd_tiles(M: int, D: int, KD: int, fp64: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Small under the interpreter (numpy
    does the work per tile); on a GPU 128 x 64 x 32 with 8 warps and 3 stages (32 x 32 x 8 for
    the float64 FMA loop).

    Chosen from ptxas register reports for sm_90 (Triton's ptxas, ``ptxas -v``), not from timings:
    at 128 x 64 x 32 / 8 warps / 3 stages no dtype spills (bfloat16 and float16 238 registers,
    float32 TF32 201, float32 IEEE 255). 128 x 128 spills at 4 and 8 warps (the gathered
    ``pos_embed`` tile and the accumulator are live together in the epilogue), and 4 warps at
    128 x 64 spill for float32 IEEE. Not tuned on a GPU yet."""
    if _INTERPRET:
        return 16, 16, 32 if KD >= 32 else 16, 1, 1
    if fp64:
        return 32, 32, 8, 4, 2
    bm = 128 if M >= 128 else max(16, triton.next_power_of_2(M))
    bn = 64 if D >= 64 else max(16, triton.next_power_of_2(D))
    return bm, bn, 32, 8 if bm == 128 else 4, 3


def _gather_tiles() -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of ``_gather_patches_kernel``: 64 x 64 on a GPU, small under the
    interpreter."""
    return (16, 32) if _INTERPRET else (64, 64)


# The kernels index rows, columns and patch columns in int32 (only image, pos_embed and output
# offsets are int64); the headroom covers the padding of the last tile.
_INT32_LIMIT = 2**31 - 2**16


def patch_embed_gather_triton(
    images: Tensor, weight: Tensor, bias: Optional[Tensor], keep: Tensor, pos_embed: Optional[Tensor]
) -> Tensor:
    """Launch ``_patch_embed_gather_fwd_kernel``; arguments arrive validated by ``ops.patch_embed_gather``.

    images ``[N, C, H, W]`` (any float dtype, any strides); weight ``[D, C, p, p]`` in the GEMM
    dtype, bias ``[D]`` in it or None; keep int32/int64 ``[N, K]``; pos_embed ``[1, L, D]`` /
    ``[L, D]`` or None. Returns ``[N, K, D]`` in ``promote(weight.dtype, pos_embed.dtype)``.
    """
    N, C, H, W = images.shape
    D, p = weight.shape[0], weight.shape[-1]
    K = keep.shape[1]
    Wp, L = W // p, (H // p) * (W // p)
    out_dtype = weight.dtype if pos_embed is None else torch.promote_types(weight.dtype, pos_embed.dtype)
    out = torch.empty((N, K, D), dtype=out_dtype, device=images.device)
    M, KD = N * K, C * p * p
    if M == 0 or D == 0:
        return out
    pos = None if pos_embed is None else pos_embed.reshape(L, D)
    if pos is not None and (L - 1) * pos.stride(0) + (D - 1) * pos.stride(1) >= _INT32_LIMIT:
        pos = pos.contiguous()  # pos_embed offsets are int32 in the kernel
    check_int32("patch_embed_gather (Triton)", {"N*K": M, "C*p*p": KD, "D*C*p*p": D * KD, "L*D": L * D,
                                                 "H": H, "W": W}, _INT32_LIMIT, "2^31 - 2^16")
    fp64 = weight.dtype == torch.float64
    bm, bn, bk, warps, stages = _fwd_tiles(M, D, KD, fp64)
    precision = input_precision(weight.dtype)
    grid = check_grid((triton.cdiv(M, bm), triton.cdiv(D, bn)), "patch_embed_gather")
    with device_of(images):  # launch on the tensors' GPU, not the current one
        wrap_triton(_patch_embed_gather_fwd_kernel)[grid](
            images, weight.contiguous(), None if bias is None else bias.contiguous(), keep.contiguous(), pos, out,
            M, K, D, KD, L, Wp, p,
            *images.stride(),
            *(pos.stride() if pos is not None else (0, 0)),
            HAS_BIAS=bias is not None,
            HAS_POS=pos is not None,
            FP64=fp64,
            ADD_FP64=out_dtype == torch.float64,
            INPUT_PRECISION=precision,
            UPCAST_DOT=upcast_dot(weight.dtype),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            num_warps=warps,
            num_stages=stages,
        )
    return out


def gather_patches_triton(images: Tensor, keep: Tensor, patch_size: int, dtype: torch.dtype) -> Tensor:
    """The kept patches ``[N, K, C*p*p]`` in ``dtype``, columns ``(c, ky, kx)`` (``_gather_patches_kernel``)."""
    N, C, H, W = images.shape
    K, p = keep.shape[1], int(patch_size)
    KD = C * p * p
    out = torch.empty((N, K, KD), dtype=dtype, device=images.device)
    M = N * K
    if M == 0:
        return out
    L = (H // p) * (W // p)  # the kernel casts each kept index (< L) to int32
    check_int32("patch_embed_gather (Triton)", {"N*K": M, "C*p*p": KD, "H": H, "W": W, "L": L}, _INT32_LIMIT,
                "2^31 - 2^16")
    bm, bk = _gather_tiles()
    grid = check_grid((triton.cdiv(M, bm), triton.cdiv(KD, bk)), "patch_embed_gather (patches)")
    with device_of(images):  # launch on the tensors' GPU, not the current one
        wrap_triton(_gather_patches_kernel)[grid](
            images, keep.contiguous(), out, M, K, KD, L, W // p, p, *images.stride(),
            BLOCK_M=bm, BLOCK_K=bk, num_warps=4,
        )
    return out
