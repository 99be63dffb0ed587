"""Block masks of SimWnW's waxing-and-waning network (SEMANTICS.md section 2).

A :class:`BlockMask` says which ``B x B`` blocks of each input image are kept, and maps that down
to the pixel mask of any feature map of the network, given the feature map's cumulative stride.

Geometry (the contract every masked kernel is tested against):

* Blocks lie on the grid ``Hb = H // B``, ``Wb = W // B`` of the input; block ``(i, j)`` covers rows
  ``[iB, (i+1)B)`` and columns ``[jB, (j+1)B)``. Partial blocks at the right/bottom edge are NOT
  grid cells: the leftover ``H % B`` rows and ``W % B`` columns belong to no block and are kept.
* Feature pixel ``(p, q)`` at cumulative stride ``s`` covers input rows ``[p*s, (p+1)*s)`` and
  columns ``[q*s, (q+1)*s)``; it is kept when any point it covers is kept. Every point outside the
  block grid is kept: leftover input pixels, and also points beyond the image, so a feature pixel
  that covers no input pixel at all (a map larger than ``ceil(H / s)``, from extra padding or
  ``ceil_mode``) is kept. That keeps an all-kept mask the dense network for every layer (bitwise
  on masked-dense layers; up to float rounding on tiles, which convolve in another order).
* Consequences: when ``B % s == 0`` a removed block removes exactly feature rows
  ``[iB/s, (i+1)B/s)`` x columns ``[jB/s, (j+1)B/s)`` at every such stride (waxing: the footprint
  never shrinks); when one feature pixel spans several blocks it is kept if any of them is kept;
  and ``pixel_mask(2s)`` is the 2x2 OR-pool of ``pixel_mask(s)``.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._utils import as_int as _as_int, build_for_cache

IntOrPair = Union[int, Sequence[int]]


def _pair(v: IntOrPair, what: str) -> Tuple[int, int]:
    """``int`` or a 2-sequence of ints (``torch.Size`` included) -> ``(a, b)``."""
    if isinstance(v, (tuple, list, torch.Size)):
        if len(v) != 2:
            raise ValueError(f"{what} must be an int or a pair of ints, got {tuple(v)!r}")
        return _as_int(v[0], what), _as_int(v[1], what)
    a = _as_int(v, what)
    return a, a


def _positive_pair(v: IntOrPair, what: str) -> Tuple[int, int]:
    a, b = _pair(v, what)
    if a <= 0 or b <= 0:
        raise ValueError(f"{what} must be positive, got {(a, b)}")
    return a, b


class BlockMask:
    """Kept blocks of a batch of images.

    Args:
        keep: bool ``[N, Hb, Wb]``, True = kept, on the input block grid ``Hb = H // B``,
            ``Wb = W // B`` (a grid of 0 rows or columns is legal: then no pixel is removed).
            It is cloned, so later in-place changes of the caller's tensor do not reach the mask
            (and the mask's own ``keep`` is read-only: see :attr:`keep`).
        block_size: ``B``, the block side in input pixels (positive int).
        image_size: ``(H, W)`` of the input images, or one int for square images.

    ``pixel_mask(stride, size)`` gives the bool ``[N, 1, h, w]`` mask of a feature map; results are
    cached per ``(stride, size, device)`` and shared, so treat them as read-only.

    Raises TypeError for a ``keep`` that is not a bool tensor or non-int sizes, ValueError for a
    ``keep`` that is not ``[N, H // B, W // B]`` or non-positive sizes.
    """

    def __init__(self, keep: Tensor, block_size: int, image_size: IntOrPair):
        if not isinstance(keep, Tensor):
            raise TypeError(f"BlockMask: keep must be a torch.Tensor, got {type(keep).__name__}")
        if keep.dtype != torch.bool:
            raise TypeError(f"BlockMask: keep must be a bool tensor (True = kept), got dtype {keep.dtype}")
        if keep.dim() != 3:
            raise ValueError(f"BlockMask: keep must be [N, Hb, Wb], got shape {tuple(keep.shape)}")
        B = _as_int(block_size, "BlockMask: block_size")
        if B <= 0:
            raise ValueError(f"BlockMask: block_size must be positive, got {B}")
        H, W = _positive_pair(image_size, "BlockMask: image_size")
        grid = (H // B, W // B)
        if tuple(keep.shape[1:]) != grid:
            raise ValueError(
                f"BlockMask: keep grid {tuple(keep.shape[1:])} does not match image {H}x{W} with block {B}: "
                f"expected [N, {grid[0]}, {grid[1]}] (H // B, W // B; partial edge blocks are no "
                f"grid cells)")
        # A normal tensor even when made under inference mode: inference tensors have no
        # version counter (below), and the tables built from keep must serve training too.
        self._keep = build_for_cache(keep.clone)
        # The version keep was made at (check_unchanged); in a trace, where reading it would be
        # a graph op, the mask lives for one call anyway.
        self._keep_version = None if torch.compiler.is_compiling() else self._keep._version
        self._block_size = B
        self._image_size = (H, W)
        self._cache: Dict[tuple, Tensor] = {}
        self._tile_indices: Dict = {}  # sparse.tiles.TileIndex.from_mask's cache
        # Made inside a torch.compile / export trace (by block_mask, per forward): its caches
        # are the trace's own, so traced code uses them (see _caches).
        self._traced = torch.compiler.is_compiling()

    def _caches(self) -> bool:
        """Whether code may read and fill this mask's caches now: always in eager code, and in a
        trace only for a mask made in it. Dynamo guards on what an outside object's cache holds,
        so a second compiled call under the same mask (an EMA teacher's, say) would find it
        filled and recompile, once per new mask (and export would leave fake tensors in it)."""
        if torch.compiler.is_compiling():
            return self._traced
        self.check_unchanged()
        return True

    def check_unchanged(self) -> None:
        """Raise if ``keep`` was changed in place by a torch op since the mask was made: its
        caches (pixel masks, kept tiles and their tables) describe that keep, so a mask refilled
        in place would run the old one. Writes that bypass the version counter (through
        ``.data`` or ``.numpy()``) are not seen. Nothing to check in a trace (the version would
        be read by a graph op)."""
        if torch.compiler.is_compiling():
            return
        if self._keep_version is not None and self._keep._version != self._keep_version:
            raise RuntimeError(
                f"{self!r}: its keep tensor was changed in place after the mask was made, but "
                f"the mask's cached pixel masks and tile tables describe the old keep. Build a "
                f"new BlockMask(keep, block_size, image_size) for each new keep")

    # ---- properties -------------------------------------------------------------------------
    @property
    def keep(self) -> Tensor:
        """bool ``[N, Hb, Wb]``, True = kept: the mask's own tensor, read-only (a change in place
        by a torch op makes the next use of the mask raise; build a new mask instead)."""
        return self._keep

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def image_size(self) -> Tuple[int, int]:
        return self._image_size

    @property
    def grid(self) -> Tuple[int, int]:
        """``(Hb, Wb) = (H // B, W // B)``."""
        return tuple(self._keep.shape[1:])

    @property
    def batch(self) -> int:
        return self._keep.shape[0]

    @property
    def device(self) -> torch.device:
        return self._keep.device

    def __repr__(self) -> str:
        return (f"BlockMask(batch={self.batch}, grid={self.grid}, block_size={self.block_size}, "
                f"image_size={self.image_size}, device={self.device})")

    def keep_ratio(self, per_sample: bool = False) -> Tensor:
        """Fraction of kept blocks: float32 scalar (or ``[N]`` with ``per_sample``), on the mask's
        device, without a host sync. 1.0 when the grid has no blocks (nothing is removed)."""
        dims = (1, 2) if per_sample else (0, 1, 2)
        nblocks = self.grid[0] * self.grid[1] * (1 if per_sample else self.batch)
        if nblocks == 0:
            shape = (self.batch,) if per_sample else ()
            return torch.ones(shape, dtype=torch.float32, device=self.device)
        return self._keep.sum(dim=dims, dtype=torch.float32) / nblocks

    def to(self, device) -> "BlockMask":
        """The same mask on ``device`` (``self`` when it is already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return BlockMask(self._keep.to(device), self._block_size, self._image_size)

    def check_input(self, x: Tensor, fn: str) -> None:
        """Raise a clear error unless ``x`` is a 4-D ``[N, C, H, W]`` tensor of this mask's batch
        on its device (``fn`` names the caller)."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{fn}: x must be a 4-D [N, C, H, W] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if self.device != x.device:
            raise ValueError(f"{fn}: mask is on {self.device} but x is on {x.device}; "
                             f"move it with mask.to(x.device)")
        if self.batch != x.shape[0]:
            raise ValueError(f"{fn}: mask batch {self.batch} does not match x batch {x.shape[0]}")

    # ---- pixel masks ------------------------------------------------------------------------
    def pixel_mask(self, stride: IntOrPair, size: IntOrPair) -> Tensor:
        """bool ``[N, 1, h, w]`` mask of a feature map of cumulative stride ``s`` (int or
        ``(sh, sw)``) and spatial ``size`` ``(h, w)`` (any non-negative size: maps smaller than
        ``ceil(H / s)`` are cut, larger ones are kept beyond the image). See the module docstring.

        Exact for any stride (dividing ``B`` or not); vectorised (an integral image of ``keep``
        read at each feature pixel's block range), device-side, no host sync; cached (inside a
        torch.compile or export trace only on a mask made in it: see ``_caches``).
        """
        sh, sw = _positive_pair(stride, "BlockMask.pixel_mask: stride")
        h, w = _pair(size, "BlockMask.pixel_mask: size")
        if h < 0 or w < 0:
            raise ValueError(f"size must be non-negative, got {(h, w)}")
        if not self._caches():
            return self._compute_pixel_mask(sh, sw, h, w)
        key = (sh, sw, h, w, self.device)
        m = self._cache.get(key)
        if m is None:
            m = build_for_cache(lambda: self._compute_pixel_mask(sh, sw, h, w))
            self._cache[key] = m
        return m

    def _compute_pixel_mask(self, sh: int, sw: int, h: int, w: int) -> Tensor:
        keep, B, dev = self._keep, self._block_size, self.device
        N, Hb, Wb = keep.shape
        # Integral image: S[n, i, j] = number of kept blocks in rows < i and columns < j.
        S = torch.zeros(N, Hb + 1, Wb + 1, dtype=torch.int32, device=dev)
        S[:, 1:, 1:] = keep.to(torch.int32).cumsum(1).cumsum(2)
        r_lo, r_hi, r_out = _axis(h, sh, B, Hb, dev)
        c_lo, c_hi, c_out = _axis(w, sw, B, Wb, dev)
        S_hi, S_lo = S.index_select(1, r_hi), S.index_select(1, r_lo)
        count = (S_hi.index_select(2, c_hi) - S_lo.index_select(2, c_hi)
                 - S_hi.index_select(2, c_lo) + S_lo.index_select(2, c_lo))
        kept = (count > 0) | r_out.view(1, h, 1) | c_out.view(1, 1, w)
        return kept.unsqueeze(1)


def _axis(n: int, s: int, B: int, nb: int, device) -> Tuple[Tensor, Tensor, Tensor]:
    """For feature indices ``p < n`` at stride ``s``: the block range ``[lo, hi)`` (clipped to the
    ``nb`` grid cells) that ``[p*s, (p+1)*s)`` overlaps, and whether it reaches past the grid
    (a point outside the grid is kept, so such a pixel is kept whatever the blocks say)."""
    p = torch.arange(n, device=device, dtype=torch.int64)
    start, end = p * s, (p + 1) * s
    lo = torch.clamp(torch.div(start, B, rounding_mode="floor"), max=nb)
    hi = torch.clamp(torch.div(end + (B - 1), B, rounding_mode="floor"), max=nb)
    return lo, hi, end > nb * B
