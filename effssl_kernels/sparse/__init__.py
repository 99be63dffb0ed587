"""Block-sparse layers of the masked (waxing-and-waning) network, SEMANTICS.md section 2:
packed kept-block tiles (:mod:`.tiles`) and the convolution on them (:mod:`.conv`)."""
from .conv import conv_tile_halo, sparse_conv2d, sparse_conv2d_packed
from .tiles import TileIndex, halo_gather, is_tile_aligned, pack, unpack

__all__ = ["TileIndex", "conv_tile_halo", "halo_gather", "is_tile_aligned", "pack",
           "sparse_conv2d", "sparse_conv2d_packed", "unpack"]
