"""Plain-PyTorch reference of tile_conv (SEMANTICS.md section 2): the halo'd tiles, then a conv."""
from __future__ import annotations

from typing import Optional, Tuple

import torch.nn.functional as F
from torch import Tensor

from .halo_gather import halo_gather_reference


def tile_conv_reference(tiles: Tensor, weight: Tensor, bias: Optional[Tensor], table: Tensor,
                        dilation: Tuple[int, int] = (1, 1)) -> Tensor:
    """Source tiles ``[T, C, bh, bw]``, weight ``[CO, C, kh, kw]``, table int64
    ``[T, bh + dh*(kh-1), bw + dw*(kw-1)]`` (:meth:`~effssl_kernels.sparse.TileIndex.halo_table`:
    zeros at its sentinels) -> ``[T, CO, bh, bw]``: ``F.conv2d`` (stride 1, no padding) of
    ``halo_gather_reference(tiles, table)``."""
    return F.conv2d(halo_gather_reference(tiles, table, 0.0), weight, bias, 1, 0, tuple(dilation))
