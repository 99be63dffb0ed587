"""SimWnW end to end: two views -> similar blocks in both directions -> masks -> sparse encoder.

A SimWnW step (SEMANTICS.md section 1; shared/research/simwnw.md section 8):

1. Two views of each image by crop-resize-flip (:meth:`SimWnW.views`: ``multi_crop`` on the
   device, boxes recorded), before any photometric change.
2. :func:`simwnw_masks`: block search of A's blocks in B and of B's blocks in A (``block_match``,
   centred by the recorded geometry when given); view A drops its blocks that have a similar
   block (PSNR above the threshold) in B, view B the same with A and B swapped. No gradients,
   no host synchronisation.
3. The photometric augmentations (the user's callable), then the encoder converted by
   ``effssl_kernels.sparsify`` (ResNets) or ``sparsify_vit`` (ViTs, patch = block) runs each view
   with its mask (:meth:`SimWnW.encode`): one host synchronisation for both views (the kept-tile
   counts, or the ViT's kept-token counts).

Example (SimSiam; SimCLR/BYOL/DINO change only the loss and the second encoder)::

    sw = ek.SimWnW(block_size=32, threshold_db=20.0)
    model = ek.sparsify(resnet50())                       # once
    for images in loader:                                 # uint8 [N, 3, H, W] on the GPU
        v = sw.views(images, 224)                          # raw views in [0, 1] + their masks
        xa, xb = photometric(v.view_a), photometric(v.view_b)
        za, zb = sw.encode(model, xa, xb, v.masks)         # backbone features, masked
        loss = simsiam_loss(head(za), head(zb))
        if step % 100 == 0:
            log(sw.removal_log(clear=True))                # one sync; drains the history
"""
from __future__ import annotations

import collections
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._utils import as_pair, int_arg
from .masks import BlockMask
from .nn.resnet import block_mask, is_sparse
from .nn.vit import is_sparse_vit, token_keep
from .ops.block_match import block_match, check_radius, check_threshold, similar_blocks
from .photometric import PhotometricSampler
from .photometric import photometric as ek_photometric
from .sparse.tiles import kept_tiles, prepare_tiles
from .tokens import keep_buckets, keep_topped_up
from .transforms import crop_centers, random_crops

__all__ = ["SimWnW", "SimWnWMasks", "SimWnWViews", "simwnw_masks"]


class SimWnWMasks(NamedTuple):
    """Both views' kept blocks. ``keep_a``, ``keep_b``: bool ``[N, Hb, Wb]`` (True = kept);
    ``psnr_a``, ``psnr_b``: float32 ``[N, Hb, Wb]`` of each block's best match in the other view;
    ``block_size``: ``B``; ``image_size``: ``(H, W)`` of the views."""

    keep_a: Tensor
    keep_b: Tensor
    psnr_a: Tensor
    psnr_b: Tensor
    block_size: int
    image_size: tuple

    def removal(self) -> Tensor:
        """float32 ``[2]`` on the masks' device: the fraction of A's and of B's blocks removed
        (batch means). No sync; ``.tolist()`` it when logging."""
        if self.keep_a.numel() == 0:  # no blocks (an empty batch): nothing removed, not NaN
            return torch.zeros(2, device=self.keep_a.device)
        return torch.stack([1 - self.keep_a.float().mean(), 1 - self.keep_b.float().mean()])


def _min_keep(keep: Tensor, psnr: Tensor, k: int) -> Tensor:
    """``keep`` with at least ``k`` blocks per sample: the ``k`` least similar (lowest PSNR;
    kept blocks count first) are forced on. No sync."""
    if k <= 0 or keep.numel() == 0:
        return keep
    N = keep.shape[0]
    flat_keep = keep.reshape(N, -1)
    key = torch.where(flat_keep, torch.full_like(psnr.reshape(N, -1), float("-inf")), psnr.reshape(N, -1))
    key = torch.nan_to_num(key, nan=float("inf"))  # NaN blocks are kept already (never similar)
    idx = torch.sort(key, dim=1, stable=True).indices[:, : min(k, key.shape[1])]
    return flat_keep.scatter(1, idx, True).view_as(keep)


@torch.no_grad()
def simwnw_masks(
    view_a: Tensor,
    view_b: Tensor,
    block_size: int,
    *,
    search_radius: Optional[int] = None,
    threshold_db: float = 20.0,
    data_range: Optional[float] = None,
    boxes_a: Optional[Tensor] = None,
    boxes_b: Optional[Tensor] = None,
    flips_a: Optional[Tensor] = None,
    flips_b: Optional[Tensor] = None,
    min_keep: int = 1,
) -> SimWnWMasks:
    """SimWnW's two masks: A drops its blocks with a similar block in B, B those with one in A.

    Args:
        view_a, view_b: ``[N, C, H, W]``, same shape/device/dtype, float32/16/bf16 in
            ``[0, data_range]`` or uint8 (``MultiViewAugment``'s ``raw`` crops, compared in
            float32 with ``data_range`` 255): the views after the geometric augmentations,
            before the photometric ones.
        block_size: ``B``; blocks on the ``H // B`` x ``W // B`` grid.
        search_radius: displacements searched around each counterpart, default ``B // 2``
            (SimWnW's search region of twice the block side).
        threshold_db: PSNR above which a pair is similar (SimWnW: 20 dB).
        data_range: peak value for the PSNR; default 1.0 for float views, 255 for uint8.
        boxes_a, boxes_b, flips_a, flips_b: the crops that made the views (``[N, 4]`` source
            pixels ``(top, left, height, width)``, bool ``[N]``), all four or none. With them each
            search starts where the block's scene point landed in the other view
            (:func:`effssl_kernels.crop_centers`); without, at the same grid position.
        min_keep: each view keeps at least this many blocks per sample (its least similar), so
            no sample is emptied (0 allows it: the masked pool then gives zeros).

    Returns:
        :class:`SimWnWMasks`. Computed under ``torch.no_grad()``, without host synchronisation.
    """
    if not isinstance(view_a, Tensor) or not isinstance(view_b, Tensor):
        raise TypeError("simwnw_masks: view_a and view_b must be tensors")
    if view_a.dim() != 4:
        raise ValueError(f"simwnw_masks: views must be [N, C, H, W], got {tuple(view_a.shape)}")
    min_keep = int_arg("min_keep", "simwnw_masks", min_keep, 0)
    check_threshold(threshold_db, "simwnw_masks")
    block_size = int_arg("block_size", "simwnw_masks", block_size, 1)
    if search_radius is not None:
        check_radius(search_radius, "simwnw_masks")
    if view_a.dtype == torch.uint8 and view_b.dtype == torch.uint8:
        view_a, view_b = view_a.float(), view_b.float()  # exact: levels 0..255
        data_range = 255.0 if data_range is None else data_range
    data_range = 1.0 if data_range is None else data_range
    r = block_size // 2 if search_radius is None else search_radius
    geometry = (boxes_a, boxes_b, flips_a, flips_b)
    if any(g is not None for g in geometry):
        if any(g is None for g in geometry):
            raise ValueError("simwnw_masks: give all of boxes_a, boxes_b, flips_a, flips_b, or none")
        size = tuple(view_a.shape[-2:])
        ca, flip = crop_centers(boxes_a, boxes_b, flips_a, flips_b, size, block_size)
        cb, _ = crop_centers(boxes_b, boxes_a, flips_b, flips_a, size, block_size)
    else:
        ca = cb = flip = None
    psnr_a, _ = block_match(view_a, view_b, block_size, r, data_range=data_range, centers=ca, flip=flip)
    psnr_b, _ = block_match(view_b, view_a, block_size, r, data_range=data_range, centers=cb, flip=flip)
    keep_a = _min_keep(~similar_blocks(psnr_a, threshold_db), psnr_a, min_keep)
    keep_b = _min_keep(~similar_blocks(psnr_b, threshold_db), psnr_b, min_keep)
    return SimWnWMasks(keep_a, keep_b, psnr_a, psnr_b, int(block_size), tuple(view_a.shape[-2:]))


class SimWnWViews(NamedTuple):
    """What :meth:`SimWnW.views` returns: ``view_a``, ``view_b`` ``[N, C, S, S]`` float32 (in
    ``[0, 1]`` without ``photometric``; whatever it returns with it, e.g. normalised values from
    a :class:`PhotometricSampler`), ``masks``, and the geometry (boxes float32 ``[N, 4]``, flips
    bool ``[N]``) for logging or other losses."""

    view_a: Tensor
    view_b: Tensor
    masks: SimWnWMasks
    boxes_a: Tensor
    boxes_b: Tensor
    flips_a: Tensor
    flips_b: Tensor


class SimWnW:
    """The SimWnW recipe, configured once: views, masks, masked encoding, removal log.

    Args:
        block_size: ``B`` (fast path: divides the view size and every ResNet stride, e.g. 32 at
            224 px, 4 at 32 px; for a ViT it must equal the patch size).
        search_radius: default ``B // 2``. threshold_db: SimWnW's 20 dB. min_keep: see
            :func:`simwnw_masks`.
        use_geometry: centre each search by the recorded crops (True) or at the same grid
            position (False).
        match_on: ``"raw"`` (default, SimWnW's choice): match the views after the geometric
            augmentations and before the photometric ones; ``"augmented"``: after both.
        record: keep each step's removal fractions (device tensors, no sync) in
            ``removal_history``, the last ``max_history`` steps (older ones are dropped, so a
            long run holds a bounded number); :meth:`removal_log` reads them (one sync) and
            with ``clear=True`` empties it. :meth:`masks` records the masks' block removal;
            :meth:`encode` of a ViT then replaces that entry by the token removal it applied,
            ``1 - K / L`` per view (mean over its samples of their group's ``K``, which rounds
            up).
        token_buckets: ViTs only. A dense token batch has one ``K``, the largest kept count of
            any sample, so one sample that keeps every token makes the whole batch keep every
            token (at batch 128 on photographs, one ``K`` removed 0% of the tokens where the
            masks marked 55% similar). :meth:`encode` therefore sorts both views' samples by
            kept count, cuts them into ``token_buckets`` equal groups (merging neighbours
            whose ``K`` is the same) and runs the model once per group, each with its own
            ``K`` (4 groups removed 41% there; ``keep_buckets``). Exact for models that treat
            samples independently (LayerNorm ViTs); a BatchNorm that uses batch statistics
            (training mode) would see per-group statistics, so it is refused. ``1``: one call
            per view.
    """

    def __init__(self, block_size: int = 32, *, search_radius: Optional[int] = None, threshold_db: float = 20.0,
                 min_keep: int = 1, use_geometry: bool = True, match_on: str = "raw", record: bool = True,
                 token_buckets: int = 4, max_history: int = 10_000):
        block_size = int_arg("block_size", "SimWnW", block_size, 1)
        if match_on not in ("raw", "augmented"):
            raise ValueError(f"SimWnW: match_on must be 'raw' or 'augmented', got {match_on!r}")
        check_threshold(threshold_db, "SimWnW")
        if search_radius is not None:  # checked here, not at the first step
            search_radius = check_radius(search_radius, "SimWnW")
        min_keep = int_arg("min_keep", "SimWnW", min_keep, 0)
        self.block_size = block_size
        self.search_radius = block_size // 2 if search_radius is None else search_radius
        self.threshold_db = float(threshold_db)
        self.min_keep = min_keep
        self.use_geometry = bool(use_geometry)
        self.match_on = match_on
        self.record = bool(record)
        self.token_buckets = int_arg("token_buckets", "SimWnW", token_buckets, 1)
        self.removal_history: collections.deque[Tensor] = collections.deque(
            maxlen=int_arg("max_history", "SimWnW", max_history, 1))
        self._recorded: Optional[tuple[SimWnWMasks, Tensor]] = None  # last masks and their entry

    def __repr__(self) -> str:
        return (f"SimWnW(block_size={self.block_size}, search_radius={self.search_radius}, "
                f"threshold_db={self.threshold_db}, min_keep={self.min_keep}, "
                f"use_geometry={self.use_geometry}, match_on={self.match_on!r}, "
                f"token_buckets={self.token_buckets})")

    def masks(self, view_a: Tensor, view_b: Tensor, boxes_a=None, boxes_b=None, flips_a=None, flips_b=None,
              *, data_range: Optional[float] = None) -> SimWnWMasks:
        """:func:`simwnw_masks` with this configuration (geometry ignored if ``use_geometry`` is
        False); records the removal fractions."""
        geo = dict(boxes_a=boxes_a, boxes_b=boxes_b, flips_a=flips_a, flips_b=flips_b) if self.use_geometry else {}
        m = simwnw_masks(view_a, view_b, self.block_size, search_radius=self.search_radius,
                         threshold_db=self.threshold_db, data_range=data_range, min_keep=self.min_keep, **geo)
        if self.record:
            entry = m.removal()
            self.removal_history.append(entry)
            self._recorded = (m, entry)
        return m

    def _record_tokens(self, masks: SimWnWMasks, removal: Union[float, Tensor]) -> None:
        """Replace the entry :meth:`masks` recorded for ``masks`` by the ViT token removal: one
        float for both views, or ``[2]`` (views A, B) on the masks' device (no copy, no sync)."""
        if not self.record or self._recorded is None or self._recorded[0] is not masks:
            return  # masks made elsewhere (simwnw_masks) were never recorded
        entry = self._recorded[1]
        for i in range(len(self.removal_history) - 1, -1, -1):
            if self.removal_history[i] is entry:
                self.removal_history[i] = (torch.full_like(entry, removal) if isinstance(removal, float)
                                           else removal.to(entry))
                break
        self._recorded = None

    def removal_log(self, clear: bool = False) -> list[tuple[float, float]]:
        """Per recorded step (the last ``max_history``), the removed fractions ``(A, B)`` as
        floats (one sync): of the blocks for ResNets, of the patch tokens for ViTs once
        :meth:`encode` ran on the step's masks. ``clear``: empty the history after reading (log
        every few hundred steps with it: each call costs its length)."""
        log = [tuple(r) for r in torch.stack(list(self.removal_history)).tolist()] if self.removal_history else []
        if clear:
            self.removal_history.clear()
            self._recorded = None
        return log

    @torch.no_grad()
    def views(
        self,
        images: Tensor,
        view_size: Union[int, Sequence[int]],
        *,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip_p: float = 0.5,
        photometric: Union[None, Callable[[Tensor], Tensor], PhotometricSampler,
                           Sequence[PhotometricSampler]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> SimWnWViews:
        """Two RandomResizedCrop + flip views of each image (one ``multi_crop`` launch) and their
        masks.

        Args:
            images: ``[N, C, H, W]`` uint8 (0..255) or float (in ``[0, 1]``) on any device.
            view_size: output side(s). scale, ratio, hflip_p: as torchvision's transforms.
            photometric: optional callable on a ``[N, C, S, S]`` float32 batch in ``[0, 1]``
                (colour jitter, blur, normalisation, ...), applied to each view after matching
                (``match_on="raw"``) or before (``"augmented"``; it must then keep ``[0, 1]``);
                or a :class:`PhotometricSampler` (both views), or a pair of them (view A, view
                B, e.g. BYOL's two recipes): each view then gets per-sample parameters drawn
                from ``generator`` and the fused :func:`effssl_kernels.photometric`.
            generator: CPU ``torch.Generator`` for the boxes, flips and sampled parameters.
        """
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError("SimWnW.views: images must be a [N, C, H, W] tensor")
        fa, fb = self._photometric_fns(photometric, images.shape[0], view_size, generator)
        v, boxes, flips = random_crops(images, 2, view_size, scale, ratio, hflip_p, generator=generator)
        va, vb = v[:, 0].float(), v[:, 1].float()
        if fa is not None and self.match_on == "augmented":
            va, vb = fa(va), fb(vb)
        m = self.masks(va, vb, boxes[:, 0], boxes[:, 1], flips[:, 0], flips[:, 1])
        if fa is not None and self.match_on == "raw":
            va, vb = fa(va), fb(vb)
        return SimWnWViews(va, vb, m, boxes[:, 0], boxes[:, 1], flips[:, 0], flips[:, 1])

    def _photometric_fns(self, photometric, N: int, view_size, generator):
        """``views``' photometric argument -> one callable per view (or ``(None, None)``)."""
        if photometric is None or (callable(photometric) and not isinstance(photometric, PhotometricSampler)):
            return photometric, photometric
        if isinstance(photometric, PhotometricSampler):
            samplers = (photometric, photometric)
        else:
            samplers = tuple(photometric) if isinstance(photometric, (tuple, list)) else ()
        if len(samplers) != 2 or not all(isinstance(x, PhotometricSampler) for x in samplers):
            raise TypeError("SimWnW.views: photometric must be a callable, a PhotometricSampler or a pair of them, "
                            f"got {photometric!r}")
        H, W = as_pair(view_size, "SimWnW.views: view_size")
        for x in samplers:
            x.check_view_size(H, W, "SimWnW.views")
        if self.match_on == "augmented" and any(x.mean is not None for x in samplers):
            raise ValueError(
                "SimWnW.views: match_on='augmented' compares views in [0, 1]: give samplers with mean=None, std=None"
            )
        return tuple((lambda x, s=s: ek_photometric(x, s.sample(N, generator=generator))) for s in samplers)

    def encode(self, model: nn.Module, view_a: Tensor, view_b: Tensor, masks: SimWnWMasks,
               *, concat: bool = False) -> tuple[Tensor, Tensor]:
        """Run the sparsified ``model`` on both views with their masks: ``(model(A), model(B))``.

        ``model`` may be wrapped (DDP, ``torch.compile``) or hold the converted encoder with a
        head; it is called as given. ResNets (``sparsify``): each view under ``block_mask``
        with its kept blocks; both views' tile lists are built with one host sync. ViTs
        (``sparsify_vit``, patch size = ``block_size``): each view keeps the tokens of its
        kept blocks (``masks.keep_a`` / ``keep_b``, so the masks' threshold and ``min_keep``
        hold), topped up with its least similar removed blocks to a ``K`` that is a multiple
        of 8 (or ``L``), one sync: with
        ``token_buckets`` > 1 (default 4) both views' samples are pooled and run in that many
        groups, each with its own ``K``; with 1, one ``K`` serves both views and each view runs
        in one call. A recorded step's removal becomes ``1 - K / L`` (per view, averaged over
        its samples). ``concat=True`` runs one call on the concatenated batch (ResNets, and
        ViTs with ``token_buckets=1``: with more, a ValueError; BatchNorm then normalises over
        both views together, as some SimCLR code does). An empty batch gives empty outputs. The
        model may return a tensor or a tuple / dict of tensors (batch first). Under DDP with
        BatchNorm and a call per view, build it with ``broadcast_buffers=False`` or pass
        ``concat=True``: the second call's buffer broadcast rewrites running statistics that the
        first call's backward saved (torch 2.11 raises).
        """
        if tuple(view_a.shape[-2:]) != tuple(masks.image_size) or view_a.shape != view_b.shape:
            raise ValueError(f"SimWnW.encode: views {tuple(view_a.shape)}, {tuple(view_b.shape)} do not "
                             f"match the masks' image size {masks.image_size}")
        N = view_a.shape[0]
        if is_sparse(model):
            B, size = masks.block_size, masks.image_size
            if concat:
                m = BlockMask(torch.cat([masks.keep_a, masks.keep_b]), B, size)
                with block_mask(m):
                    z = model(torch.cat([view_a, view_b]))
                return _split(z, N)
            ma, mb = BlockMask(masks.keep_a, B, size), BlockMask(masks.keep_b, B, size)
            counts = torch.stack([masks.keep_a.sum(), masks.keep_b.sum()]).tolist()  # the one sync
            prepare_tiles(ma, kept_tiles(ma.keep, counts[0]))
            prepare_tiles(mb, kept_tiles(mb.keep, counts[1]))
            with block_mask(ma):
                za = model(view_a)
            with block_mask(mb):
                zb = model(view_b)
            return za, zb
        # the ViT itself, or inside a wrapper (DDP, torch.compile) or a larger model (ViT + head)
        vit = next((m for m in model.modules() if is_sparse_vit(m)), None)
        if vit is not None:
            pe = getattr(vit, "patch_embed", None)
            ps = getattr(pe, "_effssl_patch", None)  # inside ek.patch_size(vit, ...): that size
            p = ps[:2] if ps is not None else getattr(pe, "patch_size", None)
            p = tuple(p) if isinstance(p, (tuple, list)) else p
            if p is not None and p != (masks.block_size, masks.block_size):
                raise ValueError(f"SimWnW.encode: a ViT's masks need block_size = its patch size in force "
                                 f"{p}, got {masks.block_size}")
            Hb, Wb = masks.keep_a.shape[1:]
            if p is not None and getattr(pe, "dynamic_img_pad", False):
                # the ViT pads to whole patches (a ceil grid); the masks' grid is the floor one
                H, W = view_a.shape[-2:]
                grid = (-(-H // p[0]), -(-W // p[1]))
                if grid != (Hb, Wb):
                    raise ValueError(f"SimWnW.encode: this ViT pads {H}x{W} views to a {grid[0]}x{grid[1]} "
                                     f"patch grid but the masks have {Hb}x{Wb} blocks: use views whose "
                                     f"size the patch size {p} divides")
            L = Hb * Wb
            if concat and self.token_buckets > 1:
                raise ValueError(f"SimWnW.encode: concat=True runs one call, but token_buckets="
                                 f"{self.token_buckets} runs a ViT's samples in groups, each with its "
                                 f"own K; use SimWnW(token_buckets=1) for one call")
            if N == 0:  # no tokens to choose (as the ResNet path, an empty batch passes through)
                return _split(model(torch.cat([view_a, view_b])), 0)
            if self.token_buckets > 1:
                return self._encode_vit_buckets(model, view_a, view_b, masks, L)
            # the tokens of the kept blocks (the masks' threshold and min_keep hold), topped up
            ka, kb, K = keep_topped_up(masks.keep_a, masks.keep_b, masks.psnr_a, masks.psnr_b)
            self._record_tokens(masks, 1.0 - K / L)
            if concat:
                with token_keep(torch.cat([ka, kb])):
                    z = model(torch.cat([view_a, view_b]))
                return _split(z, N)
            with token_keep(ka):
                za = model(view_a)
            with token_keep(kb):
                zb = model(view_b)
            return za, zb
        raise TypeError("SimWnW.encode: convert the model first with effssl_kernels.sparsify (ResNet) or "
                        "effssl_kernels.sparsify_vit (ViT)")

    def _encode_vit_buckets(self, model: nn.Module, view_a: Tensor, view_b: Tensor, masks: SimWnWMasks,
                            L: int) -> tuple[Tensor, Tensor]:
        """Both views' samples pooled, sorted by kept count, run in ``token_buckets`` groups
        (``keep_buckets``: one host sync), and put back in order."""
        bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and (m.training or m.running_mean is None)]  # batch statistics
        if bn:
            raise ValueError(f"SimWnW.encode: token_buckets={self.token_buckets} runs the batch in groups, so the "
                             f"BatchNorm {bn[0]!r} (batch statistics) would normalise each group alone; use "
                             "SimWnW(token_buckets=1) for this model")
        N = view_a.shape[0]
        groups = keep_buckets(torch.cat([masks.keep_a, masks.keep_b]), torch.cat([masks.psnr_a, masks.psnr_b]),
                              self.token_buckets)
        x = torch.cat([view_a, view_b])
        outs, k_of_row = [], torch.empty(2 * N, device=masks.keep_a.device)
        for rows, keep in groups:
            with token_keep(keep):
                outs.append(model(x[rows]))
            k_of_row[rows] = keep.shape[1]
        order = torch.cat([rows for rows, _ in groups])
        z = _join(outs, torch.argsort(order))  # back to batch order
        self._record_tokens(masks, 1.0 - k_of_row.view(2, N).mean(1) / L)
        return _split(z, N)


def _split(z, N: int):
    """A model output over ``[A; B]`` (a tensor, or a tuple / dict of them) -> ``(z_A, z_B)``."""
    leaves, spec = tree_flatten(z)
    return tuple(tree_unflatten([x[sl] if isinstance(x, Tensor) else x for x in leaves], spec)
                 for sl in (slice(None, N), slice(N, None)))


def _join(outs: list, inverse: Tensor):
    """Outputs of the groups (same structure) -> one output in batch order: each tensor leaf
    concatenated and re-ordered by ``inverse`` (row i of the result is row ``inverse[i]``)."""
    flat = [tree_flatten(o) for o in outs]
    leaves = []
    for i, x in enumerate(flat[0][0]):
        if isinstance(x, Tensor):
            x = torch.cat([f[0][i] for f in flat]).index_select(0, inverse.to(x.device))
        leaves.append(x)
    return tree_unflatten(leaves, flat[0][1])
