"""block_match and similar_blocks: the public functions, their checks and op registrations.

The C++ op ``effssl_kernels::block_match`` (CPU and CUDA kernels, schema in csrc/bindings.cpp) and
the Triton op ``effssl_kernels::_block_match_triton`` both get a fake impl here, so
``torch.compile(fullgraph=True)`` traces through them. Outputs carry no gradient.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .._utils import as_int
from ..reference.block_match import block_match_reference

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RADIUS = 1 << 16  # (2r+1)^2 candidates per block; far beyond any useful search
MAX_SIZE = 1 << 24  # keeps every pixel index of a kernel inside int32 arithmetic
MIN_RANGE, MAX_RANGE = 1e-18, 1e18  # data_range^2 stays a normal float32


def check_radius(search_radius, fn: str) -> int:
    """``search_radius`` as an int in ``[0, MAX_RADIUS]``, else TypeError/ValueError naming ``fn``
    (block_match, and SimWnW when it is built)."""
    r = as_int(search_radius, f"{fn}: search_radius")
    if r < 0:
        raise ValueError(f"{fn}: search_radius must be an int >= 0, got {r!r}")
    if r > MAX_RADIUS:
        raise ValueError(f"{fn}: search_radius must be at most {MAX_RADIUS}, got {r}")
    return r


def _check(a, b, block_size, search_radius, data_range, centers, flip) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError("block_match: a and b must be tensors")
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"block_match: a and b must be 4-D [N, C, H, W], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"block_match: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"block_match: a and b must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"block_match: a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.dtype not in _DTYPES:
        hint = (" (uint8 views: pass a.float() / 255, or use simwnw_masks, which takes uint8)"
                if a.dtype == torch.uint8 else "")
        raise TypeError(f"block_match: dtype must be float32, float16 or bfloat16, got {a.dtype}{hint}")
    N, C, H, W = a.shape
    if C < 1:
        raise ValueError("block_match: C must be at least 1")
    if max(H, W) > MAX_SIZE:
        raise ValueError(f"block_match: H and W must be at most {MAX_SIZE}")
    if block_size < 1:
        raise ValueError(f"block_match: block_size must be a positive int, got {block_size!r}")
    if block_size > H or block_size > W:
        raise ValueError(f"block_match: block_size {block_size} is larger than the image {H}x{W}")
    if C * block_size >= 2**31:  # the kernels count channel rows C * block_size in int32
        raise ValueError(f"block_match: C * block_size = {C * block_size} must be below 2^31")
    check_radius(search_radius, "block_match")
    if isinstance(data_range, bool) or not isinstance(data_range, numbers.Real):
        raise TypeError(f"block_match: data_range must be a number, got {data_range!r}")
    # Every kernel squares it in float32: keep data_range^2 a normal float32, or the psnr would
    # silently saturate (every block "similar" at +inf, or -inf that reads as "no candidate").
    if not (MIN_RANGE <= float(data_range) <= MAX_RANGE):
        raise ValueError(f"block_match: data_range must be in [{MIN_RANGE:g}, {MAX_RANGE:g}], got {data_range!r}")
    # ... and a block's sum of C * B^2 squared differences of up to data_range must fit float32,
    # or a block 0 dB away would come out -inf ("no candidate")
    block_peak = float(data_range) ** 2 * C * block_size**2
    if block_peak > torch.finfo(torch.float32).max:
        raise ValueError(f"block_match: data_range^2 * C * block_size^2 = {block_peak:.3g} overflows float32; "
                         f"scale the images down")
    Hb, Wb = H // block_size, W // block_size
    if centers is not None:
        if not isinstance(centers, Tensor):
            raise TypeError("block_match: centers must be a tensor or None")
        if centers.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"block_match: centers must be an integer tensor, got {centers.dtype}")
        if tuple(centers.shape) != (N, Hb, Wb, 2):
            raise ValueError(
                f"block_match: centers must have shape [N, Hb, Wb, 2] = {[N, Hb, Wb, 2]}, got {list(centers.shape)}"
            )
        if centers.device != a.device:
            raise ValueError(f"block_match: centers must be on {a.device}, got {centers.device}")
    if flip is not None:
        if not isinstance(flip, Tensor):
            raise TypeError("block_match: flip must be a tensor or None")
        if flip.dtype != torch.bool:
            raise TypeError(f"block_match: flip must be a bool tensor, got {flip.dtype}")
        if tuple(flip.shape) != (N,):
            raise ValueError(f"block_match: flip must have shape [N] = [{N}], got {list(flip.shape)}")
        if flip.device != a.device:
            raise ValueError(f"block_match: flip must be on {a.device}, got {flip.device}")


def _prepare_centers(centers: Optional[Tensor]) -> Optional[Tensor]:
    """int32 contiguous; int64 values beyond int32 are clamped (still outside any image)."""
    if centers is None:
        return None
    if centers.dtype == torch.int64:
        centers = centers.clamp(-(2**31), 2**31 - 1)
    return centers.to(torch.int32).contiguous()


def block_match(
    a: Tensor,
    b: Tensor,
    block_size: int,
    search_radius: int,
    *,
    data_range: float = 1.0,
    centers: Optional[Tensor] = None,
    flip: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Best match in ``b`` of every block of ``a`` within a search window (SimWnW's block search).

    Args:
        a, b: views ``[N, C, H, W]``, same shape, device and dtype (float32, float16, bfloat16),
            values in ``[0, data_range]``, any strides (channels_last, slices): the CUDA and
            Triton kernels read them in place, the CPU kernel from float32 contiguous copies
            (``b`` mirrored where ``flip`` is set).
        block_size: side ``B`` of the non-overlapping blocks of ``a``; the grid is
            ``Hb = H // B`` by ``Wb = W // B``; leftover rows/columns belong to no block.
        search_radius: ``r``; every displacement in ``[-r, r]^2`` whose block lies inside ``b``.
        data_range: peak value of the data for PSNR, in ``[1e-18, 1e18]`` with
            ``data_range^2 * C * B^2`` within float32 (ValueError otherwise: the kernels sum a
            block's squared differences in float32).
        centers: int ``[N, Hb, Wb, 2]`` ``(y, x)`` top-left in ``b`` around which each block is
            searched (default: the block's own top-left). Outside the image is legal.
        flip: bool ``[N]``: sample ``n`` of ``b`` is mirrored left-right relative to ``a``; the
            search runs on ``b`` mirrored back and ``centers`` are in that frame.

    Returns:
        ``(psnr, offset)``: float32 ``[N, Hb, Wb]`` PSNR in dB of the least-mse candidate
        (``+inf`` if identical, ``-inf`` when no candidate lies inside ``b``, NaN when NaN input
        reaches the block's candidates) and int32 ``[N, Hb, Wb, 2]`` its ``(dy, dx)``
        relative to the centre. The mse accumulates in float32. Fast kernels may return any
        candidate within 1e-4 relative of the least mse; psnr is always the direct mse of the
        returned candidate. Exact ties go to the smallest ``|dy| + |dx|``, then ``dy``, ``dx``.

    Which kernel runs (SEMANTICS.md section 5): CUDA tensors take one of three kernels by shape.
    The image kernel (one CTA per sample) when ``4 * C * (H*W + Hb*B * Wb*B)`` bytes fit in
    48 KB (CIFAR's 3x32x32: 24 KB); else the tiled kernel, the fast path (one CTA per block,
    template and search window in shared memory, ranked by the ``a^2 + b^2 - 2ab`` identity and
    the winner re-scored directly), when one channel's window fits the device's opt-in shared
    memory (B = 32: r up to 55 on an H100, 46 on an A100; more channels are staged in chunks);
    else the direct kernel (one thread per candidate, from global memory).
    ``EFFSSL_BACKEND=triton`` (or the default ``auto`` when the CUDA kernels were not built)
    takes the Triton kernel (direct mse) instead; CPU tensors the C++ kernel (direct mse, 16, 8
    or 4 horizontally adjacent candidates per vector tile). All meet the tolerance above; only
    speed differs.

    Raises ValueError/TypeError on bad shapes, dtypes, devices, sizes or arguments.
    Matches ``effssl_kernels.reference.block_match_reference``. Not differentiable.
    """
    block_size = as_int(block_size, "block_match: block_size")
    search_radius = as_int(search_radius, "block_match: search_radius")
    _check(a, b, block_size, search_radius, data_range, centers, flip)
    which = _backend.choose(a.device.type)
    if which == "reference":
        return block_match_reference(a, b, block_size, search_radius, float(data_range), centers, flip)
    centers = _prepare_centers(centers)
    # The kernels index flip as a dense [N] array: a column of the [N, 2] flips of
    # random_resized_boxes (stride 2) or an expanded flag (stride 0) must be copied first.
    flip = None if flip is None else flip.contiguous()
    if which == "triton":
        return torch.ops.effssl_kernels._block_match_triton(
            a, b, block_size, search_radius, float(data_range), centers, flip
        )
    return torch.ops.effssl_kernels.block_match.default(
        a, b, block_size, search_radius, float(data_range), centers, flip
    )


def check_threshold(threshold_db, fn: str) -> None:
    """A PSNR threshold is a real number, not NaN (which would silently mark nothing similar)."""
    if isinstance(threshold_db, bool) or not isinstance(threshold_db, numbers.Real):
        raise TypeError(f"{fn}: threshold_db must be a number, got {threshold_db!r}")
    if math.isnan(threshold_db):
        raise ValueError(f"{fn}: threshold_db must not be NaN")


def similar_blocks(psnr: Tensor, threshold_db: float = 20.0) -> Tensor:
    """bool mask, same shape as ``psnr`` (a float tensor): True where ``psnr > threshold_db``
    (NaN/-inf never). TypeError for a non-float ``psnr`` or a non-number threshold, ValueError
    for a NaN one."""
    if not isinstance(psnr, Tensor) or not psnr.is_floating_point():
        raise TypeError("similar_blocks: psnr must be a floating-point tensor")
    check_threshold(threshold_db, "similar_blocks")
    return psnr > threshold_db


def _fake(a, b, block_size, search_radius, data_range, centers, flip):
    # the wrapper's checks: a direct op call traced by compile or export must fail as the kernel would
    _check(a, b, block_size, search_radius, data_range, centers, flip)
    N, _, H, W = a.shape
    Hb, Wb = H // block_size, W // block_size
    return (
        a.new_empty((N, Hb, Wb), dtype=torch.float32),
        a.new_empty((N, Hb, Wb, 2), dtype=torch.int32),
    )


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _backward(ctx, grad_psnr, grad_offset):
    return None, None, None, None, None, None, None


if _backend.HAS_EXT:
    torch.library.register_fake("effssl_kernels::block_match")(_fake)
    torch.library.register_autograd(
        "effssl_kernels::block_match", _backward, setup_context=_setup_context
    )


@torch.library.triton_op("effssl_kernels::_block_match_triton", mutates_args=())
def _block_match_triton(
    a: Tensor,
    b: Tensor,
    block_size: int,
    search_radius: int,
    data_range: float,
    centers: Optional[Tensor],
    flip: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    from ..triton.block_match import block_match_triton  # lazy: importing triton costs ~2.5 s

    _check(a, b, block_size, search_radius, data_range, centers, flip)  # direct op calls: no wrapper
    return block_match_triton(a, b, block_size, search_radius, data_range, centers, flip)


_block_match_triton.register_autograd(_backward, setup_context=_setup_context)

_backend.register_interpreter_fakes((_block_match_triton, _fake))
