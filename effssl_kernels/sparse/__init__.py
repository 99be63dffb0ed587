"""Block-sparse layers of the masked (waxing-and-waning) network, SEMANTICS.md section 2:
packed kept-block tiles (:mod:`.tiles`), the convolution on them (:mod:`.conv`) and the
PackedMap that keeps maps packed between the layers of a sparsified model (:mod:`.packed`)."""
from .conv import conv_tile_halo, sparse_conv2d, sparse_conv2d_packed
from .packed import PackedMap, pack_map
from .tiles import TileIndex, halo_gather, is_tile_aligned, pack, unpack

__all__ = ["PackedMap", "TileIndex", "conv_tile_halo", "halo_gather", "is_tile_aligned", "pack",
           "pack_map", "sparse_conv2d", "sparse_conv2d_packed", "unpack"]
