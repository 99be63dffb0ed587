"""Packed kept-block tiles of a masked feature map (SegBlocks-style layout).

At a feature map of cumulative stride ``s = (sh, sw)`` with ``B % sh == B % sw == 0`` and spatial
size exactly ``(Hb * B / sh, Wb * B / sw)`` (the *tile-aligned* case: the image is a whole number
of blocks), block ``(i, j)`` of sample ``n`` is the tile of ``bh x bw = B/sh x B/sw`` pixels at
feature rows ``[i*bh, (i+1)*bh)`` and columns ``[j*bw, (j+1)*bw)`` (SEMANTICS.md section 2).
A map is *packed* as ``[T, C, bh, bw]``: only the ``T`` kept tiles, in row-major ``(n, i, j)``
order. Every removed pixel is zero in the masked network, so the packed tensor holds all the
information; convolutions run on it after :func:`halo_gather` has given each tile the border
pixels its kernel reads from neighbour tiles. The halo exchange, :func:`pack` and :func:`unpack`
are all the ``effssl_kernels::halo_gather`` op, each with its own cached :class:`TileIndex` table.

The kept list and slot table depend only on the mask, not on the stride, so they are built once
per mask (one host sync, to learn ``T``) and shared by the :class:`TileIndex` of every resolution.
"""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._utils import as_int as _as_int, build_for_cache
from ..masks import BlockMask, _positive_pair
from ..ops.halo_gather import halo_gather_op

IntOrPair = Union[int, Sequence[int]]


def kept_tiles(keep: Tensor, count: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """keep bool ``[N, Hb, Wb]`` -> kept int64 ``[T, 3]`` (row-major ``(n, i, j)``) and slot int64
    ``[N, Hb, Wb]`` (tile index or -1), on keep's device. ``nonzero`` is the only host sync;
    with ``count`` (``T``, known from an earlier sync) there is none."""
    if count is None:
        kept = keep.nonzero()  # the one sync: T sizes every packed tensor of the step
    else:
        kept = torch.nonzero_static(keep, size=count)
    flat = keep.reshape(-1)
    # Row-major rank of each kept block = its row in `kept` (nonzero is row-major too); no sync.
    rank = flat.to(torch.int64).cumsum(0) - 1
    slot = torch.where(flat, rank, torch.full_like(rank, -1)).view(keep.shape)
    return kept, slot


def prepare_tiles(mask: BlockMask, base: Optional[Tuple[Tensor, Tensor]] = None
                  ) -> Tuple[Tensor, Tensor]:
    """Build (or adopt ``base``, from another mask with the same keep) the kept list and slot
    table of ``mask`` now: the step's one host sync. ``block_mask`` calls it on entering the
    ``with``, so that under ``torch.compile`` the tile count comes into the graph as the size
    of an input (a dynamic size the compiler plans for) rather than from ``nonzero`` inside it
    (an unbacked size, on which Inductor's convolution layouts go wrong)."""
    mask.check_unchanged()
    entry = mask._tile_indices
    if "base" not in entry:
        entry["base"] = base if base is not None else build_for_cache(lambda: kept_tiles(mask.keep))
    return entry["base"]


def is_tile_aligned(mask: BlockMask, stride: IntOrPair) -> bool:
    """Whether the feature map of ``mask``'s images at cumulative ``stride`` is tile-aligned:
    ``B`` divisible by the stride and the image a whole number of blocks on both axes."""
    sh, sw = _positive_pair(stride, "stride")
    B = mask.block_size
    H, W = mask.image_size
    return B % sh == 0 and B % sw == 0 and H % B == 0 and W % B == 0


class TileIndex:
    """Kept tiles of a :class:`BlockMask` at one tile-aligned resolution. Build with
    :meth:`from_mask` (cached per mask and stride).

    Attributes:
        kept: int64 ``[T, 3]``, ``(n, i, j)`` of each kept block, row-major (tile ``t`` is row t).
        slot: int64 ``[N, Hb, Wb]``, the tile index of each block, -1 where removed.
        num_tiles: ``T`` (python int). tile: ``(bh, bw)``. stride: ``(sh, sw)``.
        batch: ``N``. grid: ``(Hb, Wb)``. size: the feature map ``(Hb * bh, Wb * bw)``.
    """

    def __init__(self, kept: Tensor, slot: Tensor, tile: Tuple[int, int],
                 stride: Tuple[int, int]):
        self.kept = kept
        self.slot = slot
        self.tile = tile
        self.stride = stride
        self.num_tiles = kept.shape[0]
        self.batch = slot.shape[0]
        self.grid = (slot.shape[1], slot.shape[2])
        self.size = (self.grid[0] * tile[0], self.grid[1] * tile[1])
        self._tables: Dict[tuple, object] = {}  # gather tables by kind, see _cached

    @property
    def device(self) -> torch.device:
        return self.slot.device

    def __repr__(self) -> str:
        return (f"TileIndex(tiles={self.num_tiles}, batch={self.batch}, grid={self.grid}, "
                f"tile={self.tile}, stride={self.stride}, device={self.device})")

    @classmethod
    def from_mask(cls, mask: BlockMask, stride: IntOrPair = 1) -> "TileIndex":
        """The index of ``mask`` at cumulative ``stride`` (int or ``(sh, sw)``); raises
        ValueError when that resolution is not tile-aligned (see :func:`is_tile_aligned`).
        Cached: the first call per mask does the one host sync, later strides reuse it (inside
        a torch.compile or export trace, for a mask made outside it, a new index is built on
        the cached kept list)."""
        if not isinstance(mask, BlockMask):
            raise TypeError(f"mask must be a BlockMask, got {type(mask).__name__}")
        s = _positive_pair(stride, "stride")
        if not is_tile_aligned(mask, s):
            raise ValueError(
                f"stride {s} is not tile-aligned for {mask}: needs block_size divisible by the "
                f"stride and image_size divisible by block_size")
        # Cached on the mask ({"base": (kept, slot), (sh, sw): TileIndex}): an index lives as long
        # as its mask (one step, typically) and needs no invalidation, a BlockMask's keep being
        # fixed. Not a global dict: torch.compile would guard on its keys, recompiling per mask.
        entry = mask._tile_indices
        # In a trace, on a mask made outside it: a fresh index (its tables built in the graph),
        # the cache not read or written past the kept list, which block_mask prepares on
        # entering the `with` (BlockMask._caches says why).
        caches = mask._caches()
        idx = entry.get(s) if caches else None
        if idx is None:
            base = prepare_tiles(mask) if caches else (entry.get("base") or kept_tiles(mask.keep))
            B = mask.block_size
            idx = cls(base[0], base[1], (B // s[0], B // s[1]), s)
            if caches:
                entry[s] = idx
        return idx

    def same_tiles(self, other: "TileIndex") -> bool:
        """Whether ``other`` indexes the same tiles: the same geometry and kept list, as the
        index of an equal but new mask at the same stride does (a checkpoint's recomputation
        under a ``with`` of an equal mask meets its forward's maps). Compares the kept lists by
        value (a host sync on CUDA) only when the geometry and tile count agree."""
        if self is other:
            return True
        if (self.tile, self.stride, self.batch, self.grid, self.num_tiles) != \
                (other.tile, other.stride, other.batch, other.grid, other.num_tiles):
            return False
        return self.kept is other.kept or (self.kept.device == other.kept.device
                                           and torch.equal(self.kept, other.kept))

    def halo_table(self, halo) -> Tensor:
        """int64 ``[T, bh + top + bottom, bw + left + right]``: for each pixel of each tile padded
        by ``halo`` (as in :func:`halo_gather`), its row in the packed buffer ``[T * bh * bw + 2, C]``
        (pixel-major, channels last); row ``T * bh * bw`` is the zero row, read where the
        neighbour block is removed, and row ``T * bh * bw + 1`` the outside row, read where the
        pixel lies outside the image (zero for convolutions, -inf for max pooling). Cached per
        halo.

        Any reach works: a halo wider than a tile reads tiles several blocks away."""
        key = _halo4(halo)
        return self._cached(key, lambda: self._build_halo_table(*key))

    def halo_inverse(self, halo) -> Tuple[Tensor, Tensor]:
        """The inverse of :meth:`halo_table`: ``order`` int64 ``[T * ph * pw]``, the padded pixels
        ``t*ph*pw + u*pw + v`` sorted (stably) by the source pixel they read, and ``offsets``
        int64 ``[T * bh * bw + 1]``, source pixel ``s`` being read by ``order[offsets[s]:
        offsets[s+1]]`` (zero and outside reads sort last, past ``offsets[-1]``). The backward of
        :func:`halo_gather` sums over these runs. On the device, no host sync; cached per halo."""
        key = _halo4(halo)
        return self._cached(("inverse",) + key, lambda: _inverse(
            self.halo_table(key), self.num_tiles * self.tile[0] * self.tile[1]))

    def pack_tables(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(table, order, offsets) of :func:`pack` as a gather from the dense map (source pixels
        ``(n*H + r)*W + c``): tile pixel ``(t, y, x)`` reads ``(n, i*bh + y, j*bw + x)``."""
        def build():
            (bh, bw), (H, W), T = self.tile, self.size, self.num_tiles
            n, i, j = self.kept.unbind(1)
            y = torch.arange(bh, device=self.device).view(1, bh, 1)
            x = torch.arange(bw, device=self.device).view(1, 1, bw)
            table = ((n.view(T, 1, 1) * H + i.view(T, 1, 1) * bh + y) * W
                     + j.view(T, 1, 1) * bw + x)
            return (table,) + _inverse(table, self.batch * H * W)
        return self._cached(("pack",), build)

    def unpack_tables(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(table, order, offsets) of :func:`unpack` as a gather from the tiles: dense pixel
        ``(n, r, c)`` reads its tile's pixel, or the zero row under a removed block."""
        def build():
            (bh, bw), (Hb, Wb), T = self.tile, self.grid, self.num_tiles
            P = bh * bw
            slot = self.slot.repeat_interleave(bh, 1).repeat_interleave(bw, 2)  # [N, H, W]
            r = torch.arange(Hb * bh, device=self.device).view(1, -1, 1)
            c = torch.arange(Wb * bw, device=self.device).view(1, 1, -1)
            src = slot * P + (r % bh) * bw + (c % bw)
            table = torch.where(slot >= 0, src, torch.full_like(src, T * P))
            return (table,) + _inverse(table, T * P)
        return self._cached(("unpack",), build)

    def _cached(self, key, build):
        v = self._tables.get(key)
        if v is None:
            v = self._tables[key] = build_for_cache(build)
        return v

    def _build_halo_table(self, left: int, right: int, top: int, bottom: int) -> Tensor:
        dev = self.device
        (bh, bw), (Hb, Wb), T = self.tile, self.grid, self.num_tiles
        P = bh * bw
        n, i, j = self.kept.unbind(1)  # [T] each
        # Feature row/column of each padded-tile pixel: [T, ph, 1] and [T, 1, pw].
        u = torch.arange(-top, bh + bottom, device=dev, dtype=torch.int64)
        v = torch.arange(-left, bw + right, device=dev, dtype=torch.int64)
        r = (i * bh).view(T, 1, 1) + u.view(1, -1, 1)
        c = (j * bw).view(T, 1, 1) + v.view(1, 1, -1)
        inside = (r >= 0) & (r < Hb * bh) & (c >= 0) & (c < Wb * bw)
        # Clamp before reading slot so outside pixels index a valid block; `inside` masks them.
        rc, cc = r.clamp(0, max(Hb * bh - 1, 0)), c.clamp(0, max(Wb * bw - 1, 0))
        bi = torch.div(rc, bh, rounding_mode="floor")
        bj = torch.div(cc, bw, rounding_mode="floor")
        src_tile = self.slot[n.view(T, 1, 1), bi, bj]  # [T, ph, pw], -1 where removed
        src = src_tile * P + (rc - bi * bh) * bw + (cc - bj * bw)
        src = torch.where(src_tile >= 0, src, torch.full_like(src, T * P))
        return torch.where(inside, src, torch.full_like(src, T * P + 1))


def _inverse(table: Tensor, num_sources: int) -> Tuple[Tensor, Tensor]:
    """(order, offsets) of a gather table: the entries sorted (stably) by the source they read,
    and for each source ``s < num_sources`` its run ``order[offsets[s]:offsets[s+1]]``."""
    src, order = torch.sort(table.reshape(-1), stable=True)
    starts = torch.arange(num_sources + 1, device=table.device, dtype=table.dtype)
    return order, torch.searchsorted(src, starts)


def _halo4(halo) -> Tuple[int, int, int, int]:
    """``h`` (all sides), ``(hh, hw)`` (rows, columns) or ``(left, right, top, bottom)`` (the
    ``F.pad`` order) -> ``(left, right, top, bottom)``, each non-negative."""
    if isinstance(halo, (tuple, list, torch.Size)):
        vals = tuple(_as_int(v, "halo") for v in halo)
        if len(vals) == 2:
            vals = (vals[1], vals[1], vals[0], vals[0])
        elif len(vals) != 4:
            raise ValueError(f"halo must be an int, (rows, cols) or (left, right, top, bottom), "
                             f"got {tuple(halo)!r}")
    else:
        h = _as_int(halo, "halo")
        vals = (h, h, h, h)
    if min(vals) < 0:
        raise ValueError(f"halo must be non-negative, got {vals}")
    return vals


def _check_index(index: TileIndex, fn: str) -> None:
    if not isinstance(index, TileIndex):
        raise TypeError(f"{fn}: index must be a TileIndex, got {type(index).__name__}")


def _check_tiles(tiles: Tensor, index: TileIndex, fn: str) -> None:
    _check_index(index, fn)
    if not isinstance(tiles, Tensor) or tiles.dim() != 4:
        raise ValueError(f"{fn}: tiles must be a 4-D [T, C, bh, bw] tensor, got "
                         f"{tuple(tiles.shape) if isinstance(tiles, Tensor) else type(tiles).__name__}")
    T, (bh, bw) = index.num_tiles, index.tile
    if tiles.shape[0] != T or tuple(tiles.shape[2:]) != (bh, bw):
        raise ValueError(f"{fn}: tiles shape {tuple(tiles.shape)} does not match the index: "
                         f"expected [{T}, C, {bh}, {bw}]")
    if tiles.device != index.device:
        raise ValueError(f"{fn}: tiles are on {tiles.device} but the index is on {index.device}")


def pack(x: Tensor, index: TileIndex) -> Tensor:
    """Dense ``[N, C, H, W]`` with ``(H, W) == index.size`` -> packed kept tiles
    ``[T, C, bh, bw]`` channels last (removed blocks are dropped, so their values never
    matter). The ``halo_gather`` op with :meth:`TileIndex.pack_tables`; its backward is a
    gather too (each dense pixel is read at most once: zeros elsewhere)."""
    _check_index(index, "pack")
    if not isinstance(x, Tensor):
        raise TypeError(f"pack: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"pack: x must be a 4-D [N, C, H, W] tensor, got {tuple(x.shape)}")
    if x.shape[0] != index.batch or tuple(x.shape[2:]) != index.size:
        raise ValueError(f"pack: x shape {tuple(x.shape)} does not match the index: expected "
                         f"[{index.batch}, C, {index.size[0]}, {index.size[1]}]")
    if x.device != index.device:
        raise ValueError(f"pack: x is on {x.device} but the index is on {index.device}")
    return halo_gather_op(x, *index.pack_tables())


def unpack(tiles: Tensor, index: TileIndex, out_shape: Sequence[int],
           memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """Packed ``[T, C, bh, bw]`` -> dense ``out_shape == [N, C, H, W]`` (``(H, W) ==
    index.size``) with zeros under removed blocks, in ``memory_format``. The ``halo_gather`` op
    with :meth:`TileIndex.unpack_tables`; its backward gathers the kept tiles' gradient."""
    _check_tiles(tiles, index, "unpack")
    N, C, H, W = (int(v) for v in out_shape)
    if (N, H, W) != (index.batch, *index.size) or C != tiles.shape[1]:
        raise ValueError(f"unpack: out_shape {tuple(out_shape)} does not match the index and "
                         f"tiles: expected [{index.batch}, {tiles.shape[1]}, {index.size[0]}, "
                         f"{index.size[1]}]")
    out = halo_gather_op(tiles, *index.unpack_tables())  # channels last
    return out.contiguous(memory_format=memory_format)


def halo_gather(tiles: Tensor, index: TileIndex, halo, outside: float = 0.0) -> Tensor:
    """Packed ``[T, C, bh, bw]`` -> ``[T, C, bh + top + bottom, bw + left + right]``: each tile
    with a border of ``halo`` pixels (int, ``(rows, cols)`` or ``(left, right, top, bottom)``)
    filled from its neighbour tiles, zero where the neighbour block is removed and ``outside``
    beyond the image (0 for a convolution's zero padding, ``-inf`` for max pooling's).
    The ``effssl_kernels::halo_gather`` op (C++ on CPU, Triton on CUDA) with the cached
    :meth:`TileIndex.halo_table`; its backward is a deterministic gather over
    :meth:`TileIndex.halo_inverse`. The result is channels-last strided. ``halo == 0`` returns
    ``tiles`` itself."""
    _check_tiles(tiles, index, "halo_gather")
    if isinstance(outside, bool) or not isinstance(outside, numbers.Real):  # -inf and NaN are fills too
        raise TypeError(f"halo_gather: outside must be a number, got {outside!r}")
    key = _halo4(halo)
    if key == (0, 0, 0, 0):
        return tiles
    order, offsets = index.halo_inverse(key)
    return halo_gather_op(tiles, index.halo_table(key), order, offsets, outside)
