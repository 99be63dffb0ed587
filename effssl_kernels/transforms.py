"""Two-view crops that remember their geometry, and the map from that geometry to block_match.

SimWnW searches each block of view A around its *counterpart* in view B (SEMANTICS.md section 1).
``TwoViewCrop`` draws two RandomResizedCrop boxes and flips and records them; ``crop_centers``
turns the recorded boxes and flips into the ``centers`` and ``flip`` arguments of
``effssl_kernels.block_match``, so the search starts where the same scene point landed in B.

torchvision is an optional dependency: it is imported when a ``TwoViewCrop`` is built, so the
package (and ``crop_centers``) imports without it.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

from ._utils import PicklesGenerator, as_int, as_pair, int_arg, to_device_async
from .ops.multi_crop import multi_crop

__all__ = ["crop_centers", "random_crops", "random_resized_boxes", "TwoViewCrop", "TwoViews"]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_crop_params(scale, ratio, hflip_p, fn: str) -> None:
    """RandomResizedCrop's ``scale`` and ``ratio`` ranges and the flip probability, or ValueError
    (NaN fails every comparison, so it is refused too)."""
    for name, rng in (("scale", scale), ("ratio", ratio)):
        try:  # any sequence of two real numbers (tuple, list, NumPy array)
            ok = len(rng) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in rng)
        except TypeError:
            ok = False
        if not (ok and 0 < rng[0] <= rng[1] and math.isfinite(rng[1])):
            raise ValueError(f"{fn}: {name} must be (min, max) with 0 < min <= max < inf, got {rng!r}")
    try:  # a number, NumPy scalar or one-element tensor; float("0.5") would take a string
        p = None if isinstance(hflip_p, (bool, str, bytes)) else float(hflip_p)
    except (TypeError, ValueError, RuntimeError):
        p = None
    if p is None:
        raise TypeError(f"{fn}: hflip_p must be a number in [0, 1], got {hflip_p!r}")
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"{fn}: hflip_p must be in [0, 1], got {hflip_p!r}")


def random_resized_boxes(
    n: int,
    p: int,
    image_size: Union[int, Sequence[int]],
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    hflip_p: float = 0.5,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """``n * p`` RandomResizedCrop boxes and flips at once, for :func:`effssl_kernels.multi_crop`.

    Each box follows ``torchvision.transforms.RandomResizedCrop.get_params``: up to 10 tries of
    an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``, the first
    that fits the image wins; if none fits, the centre crop of the whole image clipped to the
    ratio range. The draws are vectorised (all 10 tries of every box at once, on the CPU from
    ``generator``), so the boxes follow torchvision's distribution, not its exact random stream.

    Args:
        n, p: images and boxes per image.
        image_size: ``(H, W)`` of the source images, or an int.
        scale, ratio, hflip_p: as ``RandomResizedCrop`` and ``RandomHorizontalFlip``.
        generator: optional CPU ``torch.Generator``; device: where the results go (to CUDA
            through pinned memory, without a host synchronisation).

    Returns:
        ``(boxes, flips)``: float32 ``[n, p, 4]`` integer-valued ``(top, left, height, width)`` and
        bool ``[n, p]``.

    Raises:
        TypeError for non-int ``n``/``p``/sizes or a generator that is not a CPU
        ``torch.Generator``; ValueError for negative counts, non-positive sizes and ``scale``,
        ``ratio`` or ``hflip_p`` outside their ranges (NaN included).
    """
    H, W = as_pair(image_size, "random_resized_boxes: image_size")
    check_crop_params(scale, ratio, hflip_p, "random_resized_boxes")
    n, p = as_int(n, "random_resized_boxes: n"), as_int(p, "random_resized_boxes: p")
    if n < 0 or p < 0:
        raise ValueError(f"random_resized_boxes: n and p must be >= 0, got {n}, {p}")
    if generator is not None and not (isinstance(generator, torch.Generator) and generator.device.type == "cpu"):
        raise TypeError(f"random_resized_boxes: generator must be a CPU torch.Generator or None (the boxes "
                        f"are drawn on the CPU), got {generator!r}")
    tries = 10
    g = generator
    area = H * W * torch.empty(n, p, tries, dtype=torch.float64).uniform_(scale[0], scale[1], generator=g)
    logr = torch.empty(n, p, tries, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    r = torch.exp(logr)
    w = torch.sqrt(area * r).round()
    h = torch.sqrt(area / r).round()
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = torch.where(fits, torch.arange(tries).expand_as(fits), tries).min(-1).values  # [n, p]
    any_fit = first < tries
    pick = first.clamp(max=tries - 1)[..., None]
    h = h.gather(-1, pick)[..., 0]
    w = w.gather(-1, pick)[..., 0]
    # torchvision's fallback: the whole image, clipped to the ratio range, centred
    in_ratio = W / H
    if in_ratio < min(ratio):
        fw, fh = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = H, int(round(H * max(ratio)))
    else:
        fw, fh = W, H
    h = torch.where(any_fit, h, float(fh))
    w = torch.where(any_fit, w, float(fw))
    u = torch.rand(n, p, 2, dtype=torch.float64, generator=g)
    # torch.randint(0, H - h + 1): floor of a uniform draw over the H - h + 1 positions
    t = torch.where(any_fit, torch.floor(u[..., 0] * (H - h + 1)), float((H - fh) // 2))
    l = torch.where(any_fit, torch.floor(u[..., 1] * (W - w + 1)), float((W - fw) // 2))  # noqa: E741
    boxes = torch.stack([t, l, h, w], -1).to(torch.float32)
    flips = torch.rand(n, p, generator=g) < hflip_p
    return to_device_async(boxes, device), to_device_async(flips, device)  # drawing never stalls a step


def check_out_dtype(images: Tensor, out_dtype, fn: str) -> None:
    """TypeError unless ``out_dtype`` is None, float32, float16, bfloat16 or the images' own float dtype."""
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point and (
            out_dtype in (torch.float32, torch.float16, torch.bfloat16) or out_dtype == images.dtype)):
        raise TypeError(f"{fn}: out_dtype must be None, float32, float16, bfloat16 or the float "
                        f"images' dtype (crops of uint8 images are scaled to [0, 1]), got {out_dtype!r}")


def random_crops(
    images: Tensor,
    num_crops: int,
    size: Union[int, Sequence[int]],
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    hflip_p: float = 0.5,
    *,
    generator: torch.Generator | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``num_crops`` RandomResizedCrop + flip crops of every image: :func:`random_resized_boxes`
    and one :func:`effssl_kernels.multi_crop` launch on the images' device.

    Args:
        images: ``[N, C, H, W]``; uint8 (0..255) crops come out in ``[0, 1]`` (float32 unless
            ``out_dtype`` is float16 or bfloat16: cropped in float32, then rounded once, so a
            float32 copy of the crops is made on the way), float crops keep dtype and values.
        num_crops: ``P``. size: crop side(s). scale, ratio, hflip_p, generator: as
            :func:`random_resized_boxes`. out_dtype: None, float32, float16, bfloat16 or the
            float images' own dtype (as ``multi_crop``'s; TypeError otherwise).

    Returns:
        ``(crops, boxes, flips)``: ``[N, P, C, s, s]`` (image-major), float32 ``[N, P, 4]`` and
        bool ``[N, P]`` on the images' device.

    Raises:
        ValueError for images that are not ``[N, C, H, W]`` and what
        :func:`random_resized_boxes` refuses; TypeError for a bad ``size`` or ``out_dtype``.
    """
    num_crops = as_int(num_crops, "random_crops: num_crops")
    as_pair(size, "random_crops: size")
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError("random_crops: images must be a [N, C, H, W] tensor")
    check_out_dtype(images, out_dtype, "random_crops")
    N = images.shape[0]
    boxes, flips = random_resized_boxes(N, num_crops, tuple(images.shape[-2:]), scale, ratio, hflip_p,
                                        generator=generator, device=images.device)
    u8 = images.dtype == torch.uint8
    # uint8: cropped to float32, then scaled and rounded to out_dtype once (see emp_ssl_patches)
    crops = multi_crop(images, boxes, flips, size, out_dtype=torch.float32 if u8 else out_dtype)
    if u8:
        crops = crops.mul_(1.0 / 255).to(out_dtype or torch.float32)
    return crops.view(N, num_crops, *crops.shape[1:]), boxes, flips


def _check_crop_args(boxes_a, boxes_b, flips_a, flips_b, view_size, block_size) -> tuple[int, int, int]:
    for name, t in (("boxes_a", boxes_a), ("boxes_b", boxes_b), ("flips_a", flips_a), ("flips_b", flips_b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"crop_centers: {name} must be a tensor, got {type(t).__name__}")
    for name, t in (("boxes_a", boxes_a), ("boxes_b", boxes_b)):
        if t.dim() != 2 or t.shape[1] != 4:
            raise ValueError(f"crop_centers: {name} must have shape [N, 4] (top, left, height, width), got {list(t.shape)}")
        if not (t.is_floating_point() or t.dtype in _INT_DTYPES):
            raise TypeError(f"crop_centers: {name} must be a float or int tensor, got {t.dtype}")
    N = boxes_a.shape[0]
    if boxes_b.shape[0] != N:
        raise ValueError(f"crop_centers: boxes_a and boxes_b must have the same N, got {boxes_a.shape[0]} and {boxes_b.shape[0]}")
    for name, t in (("flips_a", flips_a), ("flips_b", flips_b)):
        if t.dtype != torch.bool:
            raise TypeError(f"crop_centers: {name} must be a bool tensor, got {t.dtype}")
        if tuple(t.shape) != (N,):
            raise ValueError(f"crop_centers: {name} must have shape [N] = [{N}], got {list(t.shape)}")
    dev = boxes_a.device
    for name, t in (("boxes_b", boxes_b), ("flips_a", flips_a), ("flips_b", flips_b)):
        if t.device != dev:
            raise ValueError(f"crop_centers: {name} must be on {dev} like boxes_a, got {t.device}")
    H, W = as_pair(view_size, "crop_centers: view_size")
    block_size = int_arg("block_size", "crop_centers", block_size, 1)  # NumPy ints too, as block_match
    if block_size > H or block_size > W:
        raise ValueError(f"crop_centers: block_size {block_size} is larger than the view {H}x{W}")
    return H, W, block_size


def _int_box(box: Tensor) -> tuple[Tensor, Tensor]:
    """int64 ``[N, 4]`` values of ``box`` (0 where not exact) and bool ``[N]``: all four are
    integers within +-2^31. No sync."""
    if box.is_floating_point():
        integral = (box == box.floor()) & (box.abs() <= 2**31)  # False for NaN and inf
        return torch.where(integral, box, 0).to(torch.int64), integral.all(-1)
    v = box.to(torch.int64)
    return v, ((v >= -(2**31)) & (v <= 2**31)).all(-1)


def crop_centers(
    boxes_a: Tensor,
    boxes_b: Tensor,
    flips_a: Tensor,
    flips_b: Tensor,
    view_size: Union[int, Sequence[int]],
    block_size: int,
) -> tuple[Tensor, Tensor]:
    """Search centres in view B of the blocks of view A, from the crops that made both views.

    Each view is its box of a source image resized to ``view_size`` (as torchvision's
    ``resized_crop``), then mirrored left-right where its flip is set. The centre of block
    ``(i, j)`` of A is carried through A's box to the source image and from there into B;
    ``centers[n, i, j]`` is the top-left ``(y, x)`` of the ``block_size`` block centred on that
    point, in B's frame mirrored back to A's orientation, and ``flip`` says which samples of B
    are mirrored relative to A. Both go straight to
    ``block_match(view_a, view_b, block_size, r, centers=centers, flip=flip)``.
    For the reverse direction (B's blocks searched in A) swap the arguments:
    ``crop_centers(boxes_b, boxes_a, flips_b, flips_a, ...)`` with ``block_match(view_b, view_a, ...)``.

    Args:
        boxes_a, boxes_b: ``[N, 4]`` float or int ``(top, left, height, width)`` in source-image
            pixels, the ``(i, j, h, w)`` of ``RandomResizedCrop.get_params``. Heights and
            widths should be positive; a sample whose box (A's or B's) has a zero, negative or
            NaN height or width gets every centre at ``(-2^30, -2^30)``, far outside the view,
            where its blocks have no candidate (psnr ``-inf``, never similar). Not raised:
            checking values would need a host sync.
        flips_a, flips_b: bool ``[N]``: the view was mirrored after the crop.
        view_size: ``(H, W)`` (or an int for square views) of both views.
        block_size: side ``B`` of A's blocks; the grid is ``Hb = H // B`` by ``Wb = W // B``.

    Returns:
        ``(centers, flip)``: int64 ``[N, Hb, Wb, 2]`` ``(y, x)`` (may lie outside the view, which
        block_match allows; the counterpart is then partly or wholly out of B) and bool ``[N]``
        ``flips_a ^ flips_b``. Both on the boxes' device. Vectorised, no host sync.

    Raises:
        TypeError / ValueError: non-tensor or wrongly typed inputs, shapes other than ``[N, 4]``
        and ``[N]``, mismatched ``N`` or devices, a non-positive view or block size, a block
        larger than the view.

    Centres are rounded half up. Integer-valued boxes (RandomResizedCrop's, whatever their
    dtype; values within +-2^31, views up to 2^24) are mapped in exact int64 arithmetic, so exact
    half ties round up and equal box sizes give exact centres: a block whose counterpart lies
    fully inside B is found at offset ``(0, 0)``. Other boxes go through float64 (float32 on
    MPS), where a value within rounding error of a tie may round either way.
    """
    H, W, B = _check_crop_args(boxes_a, boxes_b, flips_a, flips_b, view_size, block_size)
    Hb, Wb = H // B, W // B
    dev = boxes_a.device
    # MPS has no float64.
    f = torch.float32 if dev.type == "mps" else torch.float64
    ta, la, ha, wa = boxes_a.to(f).unbind(-1)  # each [N]
    tb, lb, hb, wb = boxes_b.to(f).unbind(-1)

    # Derivation, in continuous coordinates: pixel k covers [k, k+1), its centre is k + 1/2.
    # Resizing a box (t, l, h, w) to H x W with align_corners=False maps view coordinates
    # (y, x) in [0, H] x [0, W] affinely onto the box: source (t + y h/H, l + x w/W); it is
    # what interpolate samples at pixel centres (antialias only widens the filter about the same
    # point). A mirror maps x to W - x (pixel q to W - 1 - q).
    #   1. Centre of A's block (i, j) in A's displayed frame: ((i + 1/2) B, (j + 1/2) B).
    #   2. Undo A's mirror: xA' = W - xA if flip_a else xA.
    #   3. To the source: v = ta + yA ha/H, u = la + xA' wa/W.
    #   4. Into B before its mirror: yB = (v - tb) H/hb, xB' = (u - lb) W/wb.
    #   5. block_match mirrors b back where flip_a ^ flip_b, so the frame it searches is B
    #      mirrored relative to the source iff A is (flip_b + (flip_a ^ flip_b) = flip_a mod 2):
    #      xB = W - xB' if flip_a else xB'. flip_b only enters through ``flip``.
    #   6. The top-left of the B x B block centred at (yB, xB) is (yB - B/2, xB - B/2), rounded
    #      half up with floor(. + 1/2) (torch.round rounds half to even, which would make equal
    #      shifts round differently at even and odd positions).
    # Multiplied by 2 hb > 0, step 6 for y is
    #   cy = floor((2 (ta - tb) H + (2i + 1) B ha - (B - 1) hb) / (2 hb)),
    # exact in int64 for integer-valued boxes (in float64, some exact .5 ties of rescaled boxes
    # land just below .5 and round down). For x the same with the left edges la, lb, or, when A
    # is mirrored (steps 2 and 5), the negated right edges -(la + wa), -(lb + wb).
    far = 1 << 30
    ok = (ha > 0) & (wa > 0) & (hb > 0) & (wb > 0)  # False for NaN too

    # Exact path, for samples whose eight values are integers within +-2^31 (|numerator| < 2^60).
    ia, exact_a = _int_box(boxes_a)
    ib, exact_b = _int_box(boxes_b)
    exact = ok & exact_a & exact_b & (max(H, W) <= 1 << 24)
    one = torch.ones_like(ia)  # non-exact samples: a denominator that cannot be 0
    ti, li, hi, wi = torch.where(exact[:, None], ia, one).unbind(-1)
    tj, lj, hj, wj = torch.where(exact[:, None], ib, one).unbind(-1)
    ei = torch.where(flips_a, -(li + wi), li)[:, None]  # [N, 1]
    ej = torch.where(flips_a, -(lj + wj), lj)[:, None]
    k2y = torch.arange(Hb, device=dev, dtype=torch.int64) * 2 + 1  # 2i + 1
    k2x = torch.arange(Wb, device=dev, dtype=torch.int64) * 2 + 1
    num_y = 2 * H * (ti - tj)[:, None] + k2y * (B * hi[:, None]) - (B - 1) * hj[:, None]
    num_x = 2 * W * (ei - ej) + k2x * (B * wi[:, None]) - (B - 1) * wj[:, None]
    cy_exact = torch.div(num_y, 2 * hj[:, None], rounding_mode="floor")  # [N, Hb]
    cx_exact = torch.div(num_x, 2 * wj[:, None], rounding_mode="floor")  # [N, Wb]

    # Float path, the same steps for other boxes.
    yA = (torch.arange(Hb, device=dev, dtype=f) + 0.5) * B  # [Hb]
    xA = (torch.arange(Wb, device=dev, dtype=f) + 0.5) * B  # [Wb]
    fa = flips_a.view(-1, 1)
    xA_src = torch.where(fa, W - xA, xA)  # [N, Wb]
    v = ta[:, None] + yA * (ha[:, None] / H)  # [N, Hb]
    u = la[:, None] + xA_src * (wa[:, None] / W)  # [N, Wb]
    yB = (v - tb[:, None]) * (H / hb[:, None])
    xB_src = (u - lb[:, None]) * (W / wb[:, None])
    xB = torch.where(fa, W - xB_src, xB_src)
    cy = torch.floor(yB - B / 2 + 0.5)
    cx = torch.floor(xB - B / 2 + 0.5)
    # Degenerate boxes give inf/NaN here (replaced below): keep the int64 cast defined.
    cy = torch.nan_to_num(cy, nan=-far).clamp(-far, far).to(torch.int64)
    cx = torch.nan_to_num(cx, nan=-far).clamp(-far, far).to(torch.int64)

    # Per sample: the exact centres where they exist; far outside for a box without area.
    cy = torch.where(ok[:, None], torch.where(exact[:, None], cy_exact, cy).clamp(-far, far), -far)
    cx = torch.where(ok[:, None], torch.where(exact[:, None], cx_exact, cx).clamp(-far, far), -far)
    N = boxes_a.shape[0]
    centers = torch.stack(
        (cy[:, :, None].expand(N, Hb, Wb), cx[:, None, :].expand(N, Hb, Wb)), dim=-1
    ).contiguous()
    return centers, flips_a ^ flips_b


def _torchvision():
    """(RandomResizedCrop, v2.functional, InterpolationMode), imported on first use (cached by
    Python); not kept on the transform, which must stay picklable for DataLoader workers."""
    try:
        from torchvision.transforms import InterpolationMode, RandomResizedCrop
        from torchvision.transforms.v2 import functional as TF
    except ImportError as e:
        raise ImportError("TwoViewCrop needs torchvision (pip install torchvision, or the [test] extra)") from e
    return RandomResizedCrop, TF, InterpolationMode


class TwoViews(NamedTuple):
    """Two crops of one image (or of each image of a batch) and the geometry that made them.

    Fields (single image / batch of ``N``): ``view_a``, ``view_b`` ``[C, H, W]`` / ``[N, C, H, W]``;
    ``box_a``, ``box_b`` float32 ``[4]`` / ``[N, 4]`` ``(top, left, height, width)`` in source
    pixels; ``flip_a``, ``flip_b`` bool ``[]`` / ``[N]``. ``torch.utils.data.default_collate``
    of single-image ``TwoViews`` gives the batched form, ready for :func:`crop_centers`.
    """

    view_a: Tensor
    view_b: Tensor
    box_a: Tensor
    box_b: Tensor
    flip_a: Tensor
    flip_b: Tensor


# PIL modes whose to_dtype(scale=True) lands in [0, 1]; palettes are expanded first. "I" (int32,
# often 16-bit data), "F" (float, any range) and colour spaces other than RGB have no such scale.
_PIL_UNIT_MODES = ("1", "L", "LA", "RGB", "RGBA", "I;16")


def _pil_with_unit_range(img):
    if img.mode in ("P", "PA"):
        has_alpha = img.mode == "PA" or "transparency" in img.info
        return img.convert("RGBA" if has_alpha else "RGB")  # palette indices are not intensities
    if img.mode not in _PIL_UNIT_MODES:
        raise ValueError(
            f"TwoViewCrop: a PIL image in mode {img.mode!r} has no fixed [0, 1] scale (block_match's "
            f"data_range=1); convert it first, e.g. img.convert('RGB'), or pass a float tensor in [0, 1]"
        )
    return img


class TwoViewCrop(PicklesGenerator):
    """Two independent RandomResizedCrop + random horizontal flip views that record their crops.

    Each view is ``torchvision.transforms.v2.functional.resized_crop`` of a box drawn by
    torchvision's own ``RandomResizedCrop.get_params`` (bilinear, ``antialias=True``, torchvision's
    default), then ``horizontal_flip`` with probability ``hflip_p``. The same distribution as
    applying ``v2.RandomResizedCrop(size, scale, ratio, antialias=True)`` and
    ``v2.RandomHorizontalFlip(hflip_p)`` twice (not the same random stream: the draws come in
    another order), except that the boxes and flips come back with the views for :func:`crop_centers`.

    Args:
        size: output ``(H, W)`` of both views, or an int for square views.
        scale, ratio: as ``RandomResizedCrop`` (area fraction and aspect-ratio range).
        hflip_p: probability that a view is mirrored left-right.
        generator: optional ``torch.Generator`` (CPU) for reproducible draws. ``get_params``
            draws from the global RNG, so each box is drawn under ``torch.random.fork_rng``
            seeded from ``generator``, leaving the global RNG untouched. Without a generator the
            global RNG is used, as torchvision does (and DataLoader workers seed it). In a
            DataLoader each worker gets a copy of ``generator``, and without persistent workers
            each epoch a fresh copy of the unadvanced one: every worker and every epoch would
            repeat the same draws. There leave it None, or reseed it in ``worker_init_fn`` from
            ``torch.utils.data.get_worker_info().seed`` (new per worker and epoch), not a constant.
            It pickles, also into ``spawn``/``forkserver`` workers.

    Shape:
        - Input: ``[C, H, W]`` tensor (any dtype torchvision resizes; views keep it), a PIL image
          (converted to float32 in ``[0, 1]``, block_match's ``data_range=1``: modes 1, L, LA,
          RGB, RGBA, I;16, and palettes as RGB/RGBA; other modes raise), or a batch
          ``[N, C, H, W]`` (each image gets its own boxes and flips; a Python loop over ``N``).
        - Output: :class:`TwoViews`; boxes and flips on the input's device.

    Example::

        >>> crop = TwoViewCrop(64, generator=torch.Generator().manual_seed(0))
        >>> v = crop(images)                                   # images [N, 3, H, W] in [0, 1]
        >>> centers, flip = crop_centers(v.box_a, v.box_b, v.flip_a, v.flip_b, (64, 64), 8)
        >>> psnr, offset = block_match(v.view_a, v.view_b, 8, 4, centers=centers, flip=flip)
    """

    def __init__(
        self,
        size: Union[int, Sequence[int]],
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip_p: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = as_pair(size, "TwoViewCrop: size")
        check_crop_params(scale, ratio, hflip_p, "TwoViewCrop")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"TwoViewCrop: generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.scale = [float(scale[0]), float(scale[1])]
        self.ratio = [float(ratio[0]), float(ratio[1])]
        self.hflip_p = float(hflip_p)
        self.generator = generator
        _torchvision()  # fail here, not in a DataLoader worker

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={tuple(self.scale)}, "
            f"ratio={tuple(self.ratio)}, hflip_p={self.hflip_p})"
        )

    def _box(self, img: Tensor) -> tuple[int, int, int, int]:
        if self.generator is None:
            return _torchvision()[0].get_params(img, self.scale, self.ratio)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would reseed every CUDA generator too
            torch.default_generator.manual_seed(seed)
            return _torchvision()[0].get_params(img, self.scale, self.ratio)

    def _flip(self) -> bool:
        return bool(torch.rand((), generator=self.generator).item() < self.hflip_p)

    def _view(self, img: Tensor, box: tuple[int, int, int, int], flip: bool) -> Tensor:
        _, TF, mode = _torchvision()
        view = TF.resized_crop(img, *box, size=list(self.size), interpolation=mode.BILINEAR, antialias=True)
        return TF.horizontal_flip(view) if flip else view

    def _one(self, img: Tensor) -> tuple[Tensor, Tensor, tuple, tuple, bool, bool]:
        box_a, box_b = self._box(img), self._box(img)
        flip_a, flip_b = self._flip(), self._flip()
        return self._view(img, box_a, flip_a), self._view(img, box_b, flip_b), box_a, box_b, flip_a, flip_b

    def __call__(self, img) -> TwoViews:
        if not isinstance(img, Tensor):
            try:
                from PIL import Image
            except ImportError:  # pragma: no cover - torchvision depends on pillow
                Image = None
            if Image is None or not isinstance(img, Image.Image):
                raise TypeError(f"TwoViewCrop: expected a tensor or a PIL image, got {type(img).__name__}")
            TF = _torchvision()[1]
            img = TF.to_dtype(TF.to_image(_pil_with_unit_range(img)), torch.float32, scale=True).as_subclass(Tensor)
        if img.dim() not in (3, 4):
            raise ValueError(f"TwoViewCrop: expected [C, H, W] or [N, C, H, W], got {list(img.shape)}")
        if img.shape[-1] == 0 or img.shape[-2] == 0:
            raise ValueError(f"TwoViewCrop: the image is empty ({img.shape[-2]}x{img.shape[-1]} pixels)")
        dev = img.device
        if img.dim() == 3:
            va, vb, ba, bb, fa, fb = self._one(img)
            return TwoViews(
                va, vb,
                torch.tensor(ba, dtype=torch.float32, device=dev),
                torch.tensor(bb, dtype=torch.float32, device=dev),
                torch.tensor(fa, device=dev),
                torch.tensor(fb, device=dev),
            )
        if img.shape[0] == 0:
            raise ValueError("TwoViewCrop: the batch is empty")
        outs = [self._one(x) for x in img.unbind(0)]
        va, vb, ba, bb, fa, fb = zip(*outs)
        # One host-to-device copy per field rather than one per sample.
        return TwoViews(
            torch.stack(va), torch.stack(vb),
            torch.tensor(ba, dtype=torch.float32).reshape(-1, 4).to(dev),
            torch.tensor(bb, dtype=torch.float32).reshape(-1, 4).to(dev),
            torch.tensor(fa, dtype=torch.bool).to(dev),
            torch.tensor(fb, dtype=torch.bool).to(dev),
        )
