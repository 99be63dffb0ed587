"""multi_crop: the public function, its checks and op registrations (forward only).

Two ops, each with a fake impl so ``torch.compile(fullgraph=True)`` traces them: the C++ op
``effssl_kernels::multi_crop`` (CPU kernel, schema in csrc/bindings.cpp) and the Triton op
``effssl_kernels::_multi_crop_triton`` (CUDA tensors; CPU only under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _backend
from .._utils import as_pair
from ..reference.multi_crop import multi_crop_reference

# The kernels compute source rows/columns in float32 (float64 images: double), exact for
# integers up to 2^24 only: a wider image or output would read neighbouring columns silently.
MAX_SIDE = 1 << 24
_IMAGE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8)
_LOW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(images, boxes, flips, out_dtype, op: bool = True) -> torch.dtype:
    for name, t in (("images", images), ("boxes", boxes), ("flips", flips)):
        if not isinstance(t, Tensor):
            raise TypeError(f"multi_crop: {name} must be a tensor, got {type(t).__name__}")
    if images.dtype not in _IMAGE_DTYPES:
        raise TypeError(f"multi_crop: images must be float32, float64, float16, bfloat16 or uint8, got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"multi_crop: images must be [N, C, H, W], got shape {tuple(images.shape)}")
    N, C, H, W = images.shape
    if H == 0 or W == 0:
        raise ValueError(f"multi_crop: images must not be empty, got shape {tuple(images.shape)}")
    if max(H, W) > MAX_SIDE:
        raise ValueError(f"multi_crop: H and W must be at most {MAX_SIDE}, got {H}x{W}")
    if boxes.dim() != 3 or boxes.shape[0] != N or boxes.shape[2] != 4:
        raise ValueError(f"multi_crop: boxes must be [N, P, 4] with N = {N}, got shape {tuple(boxes.shape)}")
    if boxes.dtype == torch.bool or boxes.is_complex():
        raise TypeError(f"multi_crop: boxes must be a float or int tensor, got {boxes.dtype}")
    if flips.dtype != torch.bool:
        raise TypeError(f"multi_crop: flips must be a bool tensor, got {flips.dtype}")
    if tuple(flips.shape) != tuple(boxes.shape[:2]):
        raise ValueError(f"multi_crop: flips must be [N, P] = {list(boxes.shape[:2])}, got {list(flips.shape)}")
    for name, t in (("boxes", boxes), ("flips", flips)):
        if t.device != images.device:
            raise ValueError(f"multi_crop: {name} must be on {images.device} like images, got {t.device}")
    dt = images.dtype if out_dtype is None else out_dtype
    if not isinstance(dt, torch.dtype):
        raise TypeError(f"multi_crop: out_dtype must be a torch.dtype or None, got {out_dtype!r}")
    # The ops take float64 images to float64 only; the wrapper (op=False) casts their float64
    # result to a lower float itself.
    if dt != images.dtype and (dt not in _LOW_FLOATS or (op and images.dtype == torch.float64)):
        raise TypeError(
            f"multi_crop: out_dtype must be the images' dtype ({images.dtype}) or float32/float16/bfloat16"
            f"{' (not for float64 images in a direct op call)' if op and dt in _LOW_FLOATS else ''}, got {dt}"
        )
    if images.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "multi_crop is forward only (augmentation): it has no gradient. Call it on images that do "
            "not require grad (e.g. images.detach()) or under torch.no_grad()."
        )
    return dt


def _check_boxes(boxes: Tensor) -> None:
    """Finite boxes with positive sizes, with the policy of the token ops' index checks
    (ops/_indices.py): CPU, or ``EFFSSL_CHECK_INDICES=1``: a ValueError here (one host sync on
    CUDA). CUDA otherwise, and inside torch.compile (where a host check would break the graph): an
    assert in the graph, on the device (no host sync). Unlike a bad token index, which writes NaN
    rows, a bad box would give zeros or plausible values, so it is never left unchecked."""
    if boxes.numel() == 0:
        return
    b = boxes.to(torch.float32)  # checked as the kernels compute them: 1e39 is inf, 1e-50 is 0 there
    ok = torch.isfinite(b).all(-1) & (b[..., 2] > 0) & (b[..., 3] > 0)
    if not torch.compiler.is_compiling() and (
            boxes.device.type == "cpu" or os.environ.get("EFFSSL_CHECK_INDICES", "0") == "1"):
        if not bool(ok.all()):
            bad = (~ok).nonzero()[0].tolist()
            raise ValueError(
                f"multi_crop: box {bad} = {boxes[bad[0], bad[1]].tolist()} must be finite with positive height and "
                "width in float32 (the kernels' precision)"
            )
    else:
        torch._assert_async(ok.all(), "multi_crop: every box must be finite with positive height and width")


def multi_crop(
    images: Tensor,
    boxes: Tensor,
    flips: Optional[Tensor],
    out_size: Union[int, Sequence[int]],
    *,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Many crop-resize-flip patches per image in one kernel (RandomResizedCrop + flip, batched).

    ``out[n * P + p]`` is box ``boxes[n, p]`` of ``images[n]`` resized bilinearly to ``out_size``
    (``align_corners=False``, no antialias), mirrored left-right where ``flips[n, p]``. Integer
    boxes give ``torchvision.transforms.v2.functional.resized_crop(img, *box, out_size,
    antialias=False)`` (+ ``horizontal_flip``): float outputs within float rounding (1e-5 relative
    for float32), uint8 outputs within 1 (torch's uint8 resize uses fixed-point weights; ours rounds
    the float32 value half up). Boxes reaching outside the image read zeros there, as torchvision's
    padded crop. Float boxes are legal: the crop then starts between pixels (SEMANTICS.md section 4,
    formulas in effssl_kernels/reference/multi_crop.py).

    Args:
        images: ``[N, C, H, W]`` float32, float64, float16, bfloat16 or uint8, any strides
            (channels_last is read in place).
        boxes: ``[N, P, 4]`` float or int ``(top, left, height, width)`` in input pixels, the
            ``(i, j, h, w)`` of ``RandomResizedCrop.get_params``; finite, positive sizes.
        flips: bool ``[N, P]``, or None for no mirroring.
        out_size: ``(oh, ow)`` or an int for square patches.
        out_dtype: the output dtype: the images' (default) or float32/float16/bfloat16 (e.g. uint8
            images to float32 patches, values still in 0..255; float64 images are cropped in
            float64, then cast).

    Returns:
        ``[N*P, C, oh, ow]`` contiguous. Forward only: images that require grad raise.

    Kernels: C++ on CPU tensors, Triton on CUDA tensors (float64 images on CUDA run the
    reference); computed in float32 (float64 for float64 images).

    Raises TypeError/ValueError on bad dtypes, shapes, devices or boxes (on CUDA, bad boxes trip a
    device-side assert instead, to avoid a host sync; ``EFFSSL_CHECK_INDICES=1`` checks them on
    the host).
    """
    if flips is None and isinstance(boxes, Tensor):
        flips = torch.zeros(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
    dt = _check(images, boxes, flips, out_dtype, op=False)
    if images.dtype == torch.float64 and dt != torch.float64:  # computed in float64, rounded once
        return multi_crop(images, boxes, flips, out_size).to(dt)
    oh, ow = as_pair(out_size, "multi_crop: out_size")
    _check_out_size(oh, ow)
    which = _backend.choose(images.device.type, cuda_kernel=False)
    _check_boxes(boxes)  # the C++ kernel checks again (direct op calls), quoting float32 values
    if which == "reference" or (which == "triton" and images.dtype == torch.float64):
        # contiguous as the kernels' output (the reference permutes its way there)
        return multi_crop_reference(images, boxes, flips, (oh, ow), dt).contiguous()
    if which == "triton":
        return torch.ops.effssl_kernels._multi_crop_triton(images, boxes, flips, oh, ow, dt)
    return torch.ops.effssl_kernels.multi_crop.default(images, boxes, flips, oh, ow, dt)


# ----------------------------------------------------------------------------- fake impls
def _check_op(images, boxes, flips, out_h, out_w, out_dtype) -> None:
    """The op's arguments but the box values (checked by the kernels as they read them): run by
    the fake and the Triton op, so a direct op call fails as the C++ one would."""
    _check(images, boxes, flips, out_dtype)
    _check_out_size(out_h, out_w)


def _check_out_size(out_h: int, out_w: int) -> None:
    if out_h < 1 or out_w < 1:
        raise ValueError(f"multi_crop: out_size must be positive, got {(out_h, out_w)}")
    if max(out_h, out_w) > MAX_SIDE:
        raise ValueError(f"multi_crop: out_size must be at most {MAX_SIDE} a side, got {(out_h, out_w)}")


def _fake(images, boxes, flips, out_h, out_w, out_dtype):
    _check_op(images, boxes, flips, out_h, out_w, out_dtype)
    N, C = images.shape[:2]
    return images.new_empty((N * boxes.shape[1], C, out_h, out_w), dtype=out_dtype or images.dtype)


if _backend.HAS_EXT:
    torch.library.register_fake("effssl_kernels::multi_crop")(_fake)


@torch.library.triton_op("effssl_kernels::_multi_crop_triton", mutates_args=())
def _multi_crop_triton(images: Tensor, boxes: Tensor, flips: Tensor, out_h: int, out_w: int,
                       out_dtype: torch.dtype) -> Tensor:
    from ..triton.multi_crop import multi_crop_fwd  # lazy: importing triton costs ~2.5 s

    _check_op(images, boxes, flips, out_h, out_w, out_dtype)
    return multi_crop_fwd(images, boxes, flips, out_h, out_w, out_dtype)


_backend.register_interpreter_fakes((_multi_crop_triton, _fake))
