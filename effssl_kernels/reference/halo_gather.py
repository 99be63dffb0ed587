"""Plain-PyTorch reference of halo_gather on a halo table (SEMANTICS.md section 2)."""
from __future__ import annotations

from torch import Tensor


def halo_gather_reference(tiles: Tensor, table: Tensor, outside: float = 0.0) -> Tensor:
    """Source ``[T, C, bh, bw]``, table int64 ``[R, ph, pw]`` of source pixels
    ``t*bh*bw + y*bw + x`` (``S = T*bh*bw``: zero, ``S + 1``: ``outside``) -> ``[R, C, ph, pw]``
    channels-last strided (R = T: each tile with its halo; other tables pack or unpack). One ``index_select`` of whole pixel rows from a channels-last buffer
    with the zero and outside rows appended; its autograd backward is a scatter-add."""
    T, C, bh, bw = tiles.shape
    S = T * bh * bw
    buf = tiles.new_zeros((S + 2, C))
    buf[:S].view(T, bh, bw, C).copy_(tiles.permute(0, 2, 3, 1))
    if outside != 0:
        buf[S + 1].fill_(outside)
    R, ph, pw = table.shape
    out = buf.index_select(0, table.reshape(-1))
    return out.view(R, ph, pw, C).permute(0, 3, 1, 2)


def halo_gather_backward_reference(grad: Tensor, table: Tensor, num_tiles: int, bh: int, bw: int) -> Tensor:
    """The adjoint of :func:`halo_gather_reference`: ``grad`` ``[R, C, ph, pw]`` -> ``[num_tiles, C,
    bh, bw]``, ``grad`` summed into the source pixels ``table`` names (reads of the zero and
    outside rows dropped). One ``index_add`` of pixel rows."""
    R, C, ph, pw = grad.shape
    S = num_tiles * bh * bw
    rows = grad.permute(0, 2, 3, 1).reshape(R * ph * pw, C)
    buf = grad.new_zeros((S + 2, C)).index_add(0, table.reshape(-1), rows)
    return buf[:S].view(num_tiles, bh, bw, C).permute(0, 3, 1, 2)
