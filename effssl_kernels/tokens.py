"""Which patch tokens a ViT keeps: random token dropout and SimWnW's similar-token removal.

Both return ``keep``, int64 ``[N, K]`` indices of patch tokens (prefix tokens such as cls and
registers are not counted: they are always kept, see ``effssl_kernels.token_keep``), each row
sorted ascending, with one ``K`` for the whole batch (SEMANTICS.md section 3). ``K`` is rounded
up to ``multiple_of`` (default 8, capped at the number of patches) so that the sequence length
of the blocks is tensor-core friendly and ``torch.compile`` sees few distinct shapes.
"""
from __future__ import annotations

import itertools
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ._utils import int_arg
from .ops import block_match
from .ops.block_match import check_threshold

__all__ = ["random_token_keep", "similar_token_keep", "round_keep_count", "tokens_from_psnr", "keep_buckets"]


def round_keep_count(count: int, num_patches: int, multiple_of: int = 8) -> int:
    """``min(L, roundup(max(1, count), multiple_of))``: the batch's ``K`` (never 0, never above L).

    Raises TypeError / ValueError unless ``num_patches`` and ``multiple_of`` are ints >= 1."""
    int_arg("num_patches", "round_keep_count", num_patches, 1)
    int_arg("multiple_of", "round_keep_count", multiple_of, 1)
    count = max(1, int(count))
    return min(num_patches, -(-count // multiple_of) * multiple_of)


def random_token_keep(
    batch: int,
    num_patches: int,
    keep_ratio: float,
    *,
    multiple_of: int = 8,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> Tensor:
    """A uniformly random subset of patch tokens per sample (timm ``PatchDropout`` semantics).

    The base count is timm's ``max(1, int(num_patches * keep_ratio))``; it is rounded up to
    ``K = min(L, roundup(base, multiple_of))`` (``multiple_of=1`` gives timm's count exactly).
    Each row is an independent uniform subset (the first ``K`` of an argsort of random keys, as
    timm does), sorted ascending, without duplicates.

    Args:
        batch: ``N >= 0`` samples.
        num_patches: ``L >= 1`` patch tokens per sample (prefix tokens not counted).
        keep_ratio: fraction of tokens kept, in ``(0, 1]`` (timm's ``1 - prob``).
        multiple_of: ``K`` is a multiple of it (or ``L``).
        generator: random source; the keys are drawn on its device.
        device: device of the result (default: the generator's device, else CPU).

    Returns:
        int64 ``[N, K]``. No host synchronisation.

    Raises:
        TypeError / ValueError for non-int sizes, ``L < 1``, a ratio outside ``(0, 1]`` or
        ``multiple_of < 1``, or a generator on another device than ``device``.
    """
    fn = "random_token_keep"
    int_arg("batch", fn, batch, 0)
    int_arg("num_patches", fn, num_patches, 1)
    int_arg("multiple_of", fn, multiple_of, 1)
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):  # NumPy floats too
        raise TypeError(f"{fn}: keep_ratio must be a float, got {type(keep_ratio).__name__}")
    keep_ratio = float(keep_ratio)
    if not (0.0 < keep_ratio <= 1.0):  # also rejects NaN
        raise ValueError(f"{fn}: keep_ratio must be in (0, 1], got {keep_ratio}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"{fn}: generator is on {generator.device} but device is {device}")

    base = max(1, int(num_patches * keep_ratio))
    K = round_keep_count(base, num_patches, multiple_of)
    keys = torch.rand(batch, num_patches, generator=generator, device=device)
    # argsort of iid keys is a uniform random permutation; its first K a uniform subset.
    keep = torch.argsort(keys, dim=1)[:, :K]
    return keep.sort(dim=1).values


def similar_token_keep(
    view_a: Tensor,
    view_b: Tensor,
    patch_size: int,
    *,
    threshold_db: float = 20.0,
    multiple_of: int = 8,
    data_range: float = 1.0,
    search_radius: int = 0,
    centers: Optional[Sequence[Tensor]] = None,
    flip: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """SimWnW for ViTs: each view drops its patch tokens that have a similar patch in the other view.

    Patches are ``block_match`` blocks with ``block_size = patch_size``: ``keep_a`` comes from
    ``block_match(view_a, view_b, ...)``, ``keep_b`` from ``block_match(view_b, view_a, ...)``.
    A token is similar when its PSNR is above ``threshold_db`` (NaN and ``-inf``, i.e. no
    candidate, are never similar). By default (``search_radius=0``, no ``centers``) a patch is
    compared with the patch at the same place of the other view only, which suits views that
    share their geometry; pass ``centers`` (from ``effssl_kernels.crop_centers``) and a radius
    to follow the scene point across two different crops.

    One ``K = min(L, roundup(max(1, c), multiple_of))`` serves both views, ``c`` the largest
    count of non-similar tokens of any sample of either view, so the two views can also be
    concatenated into one batch. Every sample keeps all its non-similar tokens and fills up to
    ``K`` with its least similar (lowest PSNR, then lowest index) remaining tokens, so no
    sample loses a dissimilar token. Rows are sorted ascending.

    Args:
        view_a, view_b: ``[N, C, H, W]``, same shape, device and dtype (float32, float16,
            bfloat16), values in ``[0, data_range]``; ``patch_size`` must divide ``H`` and ``W``.
        patch_size: the ViT's patch side ``p``; ``L = (H / p) * (W / p)``.
        threshold_db: PSNR above which a token counts as similar (SimWnW: 20 dB).
        multiple_of: ``K`` is a multiple of it (or ``L``).
        data_range, search_radius, flip: as in ``block_match`` (``flip`` is symmetric: it serves
            both directions).
        centers: None or a pair ``(centers_a, centers_b)`` of int ``[N, H/p, W/p, 2]``: the
            search centres in B of A's patches and in A of B's patches
            (``crop_centers(boxes_a, boxes_b, ...)`` and ``crop_centers(boxes_b, boxes_a, ...)``).

    Returns:
        ``(keep_a, keep_b)``: int64 ``[N, K]`` each, on the views' device. One host
        synchronisation (reading ``K``).

    Raises:
        TypeError / ValueError for what ``block_match`` rejects, a patch size that does not
        divide the image, a malformed ``centers`` pair or bad ``threshold_db``/``multiple_of``.
    """
    fn = "similar_token_keep"
    if not isinstance(view_a, Tensor) or not isinstance(view_b, Tensor):
        raise TypeError(f"{fn}: view_a and view_b must be tensors")
    if view_a.dim() != 4:
        raise ValueError(f"{fn}: views must be 4-D [N, C, H, W], got {tuple(view_a.shape)}")
    int_arg("patch_size", fn, patch_size, 1)
    int_arg("multiple_of", fn, multiple_of, 1)
    H, W = view_a.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"{fn}: patch_size {patch_size} must divide the image size {H}x{W}")
    check_threshold(threshold_db, fn)
    if centers is None:
        centers_a = centers_b = None
    else:
        if isinstance(centers, Tensor) or not isinstance(centers, (tuple, list)) or len(centers) != 2:
            raise TypeError(f"{fn}: centers must be None or a pair (centers_a, centers_b)")
        centers_a, centers_b = centers
        if centers_a is None or centers_b is None:
            raise TypeError(f"{fn}: centers must hold two tensors, got {type(centers_a)} and {type(centers_b)}")

    kw = dict(data_range=data_range)
    psnr_a, _ = block_match(view_a, view_b, patch_size, search_radius, centers=centers_a, flip=flip, **kw)
    if search_radius == 0 and centers is None and flip is None:
        psnr_b = psnr_a  # same place in both views: the mse is symmetric, no second search
    else:
        psnr_b, _ = block_match(view_b, view_a, patch_size, search_radius, centers=centers_b, flip=flip, **kw)
    return tokens_from_psnr(psnr_a, psnr_b, threshold_db, multiple_of)


def tokens_from_psnr(psnr_a: Tensor, psnr_b: Tensor, threshold_db: float = 20.0,
                     multiple_of: int = 8) -> tuple[Tensor, Tensor]:
    """The token choice of :func:`similar_token_keep` from both directions' block_match PSNRs
    (float32 ``[N, Hb, Wb]`` each, patches = blocks): ``(keep_a, keep_b)`` int64 ``[N, K]``, one
    host sync (reading ``K``).

    Raises TypeError / ValueError for PSNR maps that are not floating-point 3-D tensors of one
    shape and device with at least one block, a NaN or non-number ``threshold_db``, or a
    ``multiple_of`` that is not an int >= 1."""
    fn = "tokens_from_psnr"
    if not isinstance(psnr_a, Tensor) or not isinstance(psnr_b, Tensor):
        raise TypeError(f"{fn}: psnr_a and psnr_b must be tensors")
    if not (psnr_a.is_floating_point() and psnr_b.is_floating_point()):
        raise TypeError(f"{fn}: PSNR maps must be floating point, got {psnr_a.dtype} and {psnr_b.dtype}")
    if psnr_a.dim() != 3 or psnr_a.shape != psnr_b.shape:
        raise ValueError(f"{fn}: PSNR maps must be [N, Hb, Wb] of one shape, got "
                         f"{tuple(psnr_a.shape)} and {tuple(psnr_b.shape)}")
    if psnr_a.device != psnr_b.device:
        raise ValueError(f"{fn}: PSNR maps are on {psnr_a.device} and {psnr_b.device}")
    if psnr_a.shape[1] * psnr_a.shape[2] == 0:
        raise ValueError(f"{fn}: PSNR maps hold no block, got {tuple(psnr_a.shape)}")
    check_threshold(threshold_db, fn)
    int_arg("multiple_of", fn, multiple_of, 1)
    keep_a, keep_b, _ = keep_topped_up(~(psnr_a > threshold_db), ~(psnr_b > threshold_db),  # NaN, -inf: kept
                                       psnr_a, psnr_b, multiple_of)
    return keep_a, keep_b


def _fill_up(kept: Tensor, psnr: Tensor, K: int) -> Tensor:
    """Rows ``[..., L]`` -> int64 ``[..., K]`` ascending: every kept token, then the least
    similar removed ones (lowest PSNR, NaN last, then lowest index: deterministic)."""
    # Kept tokens sort first (-inf), then removed ones by rising PSNR; the stable sort breaks
    # ties by index.
    key = torch.where(kept, float("-inf"), torch.nan_to_num(psnr, nan=float("inf")))
    return torch.sort(key, dim=-1, stable=True).indices[..., :K].sort(dim=-1).values


def keep_topped_up(kept_a: Tensor, kept_b: Tensor, psnr_a: Tensor, psnr_b: Tensor,
                   multiple_of: int = 8) -> tuple[Tensor, Tensor, int]:
    """Both views' token lists from bool keep grids ``[N, Hb, Wb]`` and their PSNRs (same
    shape): ``(keep_a, keep_b, K)``, int64 ``[N, K]`` rows ascending. Every kept token is kept;
    one ``K = round_keep_count(c, L, multiple_of)`` serves both views, ``c`` the largest kept
    count of any sample of either (the one host sync); each row fills up to ``K`` with its
    least similar removed tokens (lowest PSNR, NaN last, then lowest index: deterministic)."""
    N = kept_a.shape[0]
    L = kept_a.shape[1] * kept_a.shape[2]
    kept = torch.stack((kept_a.reshape(N, L), kept_b.reshape(N, L)))  # [2, N, L]
    psnr = torch.stack((psnr_a.reshape(N, L), psnr_b.reshape(N, L)))
    K = round_keep_count(int(kept.sum(-1).max()) if N else 1, L, multiple_of)  # the one sync
    chosen = _fill_up(kept, psnr, K)
    return chosen[0], chosen[1], K


def keep_buckets(kept: Tensor, psnr: Tensor, buckets: int,
                 multiple_of: int = 8) -> list[tuple[Tensor, Tensor]]:
    """Split a batch into ``buckets`` groups of samples with similar kept counts, each with its
    own ``K``: ``[(rows, keep), ...]``, ``rows`` int64 ``[n_g]`` (indices into the batch),
    ``keep`` int64 ``[n_g, K_g]`` rows ascending, as :func:`keep_topped_up` makes them.

    One ``K`` per batch (SEMANTICS.md section 3) is the largest kept count of any sample, so a
    single sample that keeps everything makes the whole batch keep everything. Sorting the
    samples by kept count and cutting them into ``buckets`` equal groups (``tensor_split``;
    ties in row order) gives each group the ``K`` of its own largest count; neighbouring groups
    with the same ``K`` are merged, so at most ``min(buckets, M)`` groups come back, never empty.
    Run the model once per group. ``kept`` bool ``[M, L]``, ``psnr`` ``[M, L]`` (or
    ``[M, Hb, Wb]`` grids). One host sync."""
    buckets = int_arg("buckets", "keep_buckets", buckets, 1)
    int_arg("multiple_of", "keep_buckets", multiple_of, 1)
    if not isinstance(kept, Tensor) or not isinstance(psnr, Tensor):
        raise TypeError("keep_buckets: kept and psnr must be tensors")
    if kept.dtype != torch.bool or not psnr.is_floating_point():
        raise TypeError(f"keep_buckets: kept must be bool and psnr floating point, got {kept.dtype} and {psnr.dtype}")
    if kept.shape != psnr.shape or kept.dim() < 2:
        raise ValueError(f"keep_buckets: kept must be bool [M, L] (or [M, Hb, Wb]) and psnr the same shape, got "
                         f"{kept.dtype} {tuple(kept.shape)} and {tuple(psnr.shape)}")
    M = kept.shape[0]
    if M == 0:
        raise ValueError("keep_buckets: empty batch")
    kept, psnr = kept.reshape(M, -1), psnr.reshape(M, -1)
    L = kept.shape[1]
    counts = kept.sum(-1)
    order = torch.argsort(counts, stable=True)
    groups = order.tensor_split(min(buckets, M))
    ranked = counts[order]
    ends = itertools.accumulate(len(g) for g in groups)  # sizes are shapes: no sync
    largest = torch.stack([ranked[e - 1] for e in ends]).tolist()  # each group's last (sorted); the one sync
    ks = [round_keep_count(c, L, multiple_of) for c in largest]
    merged: list[list] = []  # neighbours with the same K run as one group: fewer model calls
    for rows, K in zip(groups, ks):
        if merged and merged[-1][1] == K:
            merged[-1][0].append(rows)
        else:
            merged.append([[rows], K])
    out = []
    for parts, K in merged:
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        out.append((rows, _fill_up(kept[rows], psnr[rows], K)))
    return out
