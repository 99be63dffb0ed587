"""Public functions: the only code that calls the compiled extension or launches Triton."""
from .block_match import block_match, similar_blocks
from .gather_tokens import gather_tokens
from .halo_gather import halo_gather_op
from .multi_crop import multi_crop
from .patch_embed_gather import patch_embed_gather
from . import photometric as _photometric  # noqa: F401  (registers its fake and Triton op at import)
from .tile_conv import tile_conv

__all__ = ["block_match", "gather_tokens", "halo_gather_op", "multi_crop", "patch_embed_gather", "similar_blocks",
           "tile_conv"]
