"""Plain-PyTorch references: the oracle of every test and the baseline of every benchmark."""
from .block_match import block_match_reference, candidate_order
from .gather_tokens import (
    gather_tokens_reference,
    patch_embed_gather_reference,
    patch_embed_reference,
)
from .halo_gather import halo_gather_reference
from .masked_net import (
    masked_avg_pool_reference,
    masked_batch_norm_reference,
    masked_conv2d_reference,
    masked_max_pool2d_reference,
)
from .multi_crop import multi_crop_reference
from .photometric import photometric_reference
from .tcr import tcr_loss_reference
from .tile_conv import tile_conv_reference

__all__ = [
    "block_match_reference",
    "candidate_order",
    "gather_tokens_reference",
    "halo_gather_reference",
    "masked_avg_pool_reference",
    "masked_batch_norm_reference",
    "masked_conv2d_reference",
    "masked_max_pool2d_reference",
    "multi_crop_reference",
    "patch_embed_gather_reference",
    "photometric_reference",
    "patch_embed_reference",
    "tcr_loss_reference",
    "tile_conv_reference",
]
