"""Drop-in modules and model converters built on the ops."""
from .resnet import block_mask, input_strides, is_sparse, sparsify, tile_plan, unsparsify
from .resnet import checkpoint as masked_checkpoint
from .vit import is_sparse_vit, patch_size, sparsify_vit, token_keep, unsparsify_vit

__all__ = [
    "sparsify", "unsparsify", "block_mask", "masked_checkpoint", "input_strides", "is_sparse",
    "tile_plan",
    "sparsify_vit", "unsparsify_vit", "token_keep", "patch_size", "is_sparse_vit",
]
