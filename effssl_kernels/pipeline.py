"""Multi-view augmentation on the device: uint8 images -> crops -> photometric -> network input.

For each crop group (SimSiam/BYOL's two views, DINO's 2 global + N local crops)::

    random_resized_boxes (CPU draw, pinned copy)  -> multi_crop (one launch, geometry recorded)
    -> raw uint8 crops (what simwnw_masks compares, before any colour change)
    -> PhotometricSampler draw (CPU) -> photometric (one fused kernel, CPU params packed and
       copied through pinned memory) -> normalised float32 views

No host synchronisation in a call: every random draw happens on the CPU and reaches the device
through pinned memory. Outputs come from torch's caching allocator, which hands the same blocks
back step after step (no cudaMalloc after the first step); the pinned staging buffers are cached
by torch's host allocator likewise.

    aug = MultiViewAugment.dino(num_local=8)
    out = aug(images_u8_cuda)        # out.views[0], out.views[1]: [N, 3, 224, 224]; views[2]: [N*8, 3, 96, 96]
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._utils import PicklesGenerator
from .ops.multi_crop import multi_crop
from .photometric import PhotometricParams, PhotometricSampler, photometric
from .transforms import check_crop_params, random_resized_boxes

__all__ = ["CropGroup", "MultiViews", "MultiViewAugment"]


class CropGroup(NamedTuple):
    """``num`` crops per image of side ``size``, RandomResizedCrop area ``scale``, and the
    photometric ``sampler`` of those crops."""

    num: int
    size: int
    scale: Tuple[float, float]
    sampler: PhotometricSampler


class MultiViews(NamedTuple):
    """One entry per crop group, rows image-major (row ``n * num + p`` is crop ``p`` of image ``n``):

    views: ``[N * num, 3, size, size]``, photometric applied: float32 normalised when the
        sampler normalises (its ``mean``/``std``), else the raw dtype (uint8 for uint8 images).
    raw: uint8 ``[N * num, 3, size, size]``, the crops before any photometric change.
    boxes: float32 ``[N, num, 4]`` ``(top, left, height, width)``; flips: bool ``[N, num]``.
    params: the :class:`PhotometricParams` drawn (on the CPU).
    """

    views: List[Tensor]
    raw: List[Tensor]
    boxes: List[Tensor]
    flips: List[Tensor]
    params: List[PhotometricParams]


class MultiViewAugment(PicklesGenerator):
    """Crop groups applied to a uint8 batch on its device (see the module docstring).

    Args:
        groups: the :class:`CropGroup` s, in output order.
        ratio, hflip_p: RandomResizedCrop's aspect-ratio range and the flip probability.
        generator: optional CPU ``torch.Generator`` for every draw (boxes, flips and the
            photometric parameters), so a run is reproducible; ``None`` uses each sampler's own
            generator and the global RNG. Used in DataLoader workers (a ``collate_fn``), each
            worker, and without persistent workers each epoch, gets a copy of the unadvanced
            generator and would repeat the same draws: there leave it None or reseed it in
            ``worker_init_fn`` from ``torch.utils.data.get_worker_info().seed``.
    """

    def __init__(
        self,
        groups: Sequence[CropGroup],
        ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip_p: float = 0.5,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        groups = [CropGroup(*g) for g in groups]
        if not groups:
            raise ValueError("MultiViewAugment: give at least one crop group")
        for g in groups:
            if not isinstance(g.num, int) or g.num < 1 or not isinstance(g.size, int) or g.size < 1:
                raise ValueError(f"MultiViewAugment: num and size must be positive ints, got {g.num!r}, {g.size!r}")
            if not isinstance(g.sampler, PhotometricSampler):
                raise TypeError(f"MultiViewAugment: sampler must be a PhotometricSampler, got {type(g.sampler).__name__}")
            check_crop_params(g.scale, ratio, hflip_p, "MultiViewAugment")  # now, not at the first call
            g.sampler.check_view_size(g.size, g.size, "MultiViewAugment")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"MultiViewAugment: generator must be a torch.Generator, got {type(generator).__name__}")
        self.groups, self.ratio, self.hflip_p, self.generator = groups, tuple(ratio), float(hflip_p), generator

    @classmethod
    def two_view(cls, size: int = 224, scale: Tuple[float, float] = (0.08, 1.0),
                 samplers: Optional[Sequence[PhotometricSampler]] = None, **kw) -> "MultiViewAugment":
        """Two views per image (SimSiam, BYOL, SimCLR); default samplers BYOL's view 1 and view 2."""
        a, b = samplers if samplers is not None else (PhotometricSampler.byol(1), PhotometricSampler.byol(2))
        return cls([CropGroup(1, size, scale, a), CropGroup(1, size, scale, b)], **kw)

    @classmethod
    def dino(cls, num_local: int = 8, global_size: int = 224, local_size: int = 96,
             global_scale: Tuple[float, float] = (0.4, 1.0), local_scale: Tuple[float, float] = (0.05, 0.4),
             **kw) -> "MultiViewAugment":
        """DINO's 2 global crops (its two global recipes) and ``num_local`` local crops."""
        groups = [
            CropGroup(1, global_size, global_scale, PhotometricSampler.dino_global(1)),
            CropGroup(1, global_size, global_scale, PhotometricSampler.dino_global(2)),
        ]
        if num_local:
            groups.append(CropGroup(num_local, local_size, local_scale, PhotometricSampler.dino_local()))
        return cls(groups, **kw)

    def __call__(self, images: Tensor) -> MultiViews:
        """``images``: uint8 ``[N, 3, H, W]`` on any device (channels_last read in place)."""
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            got = f"{images.dtype} {list(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"MultiViewAugment: images must be uint8 [N, 3, H, W], got {got}")
        N = images.shape[0]
        out = MultiViews([], [], [], [], [])
        for g in self.groups:
            boxes, flips = random_resized_boxes(N, g.num, tuple(images.shape[-2:]), g.scale, self.ratio,
                                                self.hflip_p, generator=self.generator, device=images.device)
            raw = multi_crop(images, boxes, flips, g.size)
            params = g.sampler.sample(N * g.num, generator=self.generator)
            out.views.append(photometric(raw, params))
            out.raw.append(raw)
            out.boxes.append(boxes)
            out.flips.append(flips)
            out.params.append(params)
        return out

    def __repr__(self) -> str:
        groups = ", ".join(f"{g.num}x{g.size}px scale={g.scale}" for g in self.groups)
        return f"MultiViewAugment([{groups}], ratio={self.ratio}, hflip_p={self.hflip_p})"
