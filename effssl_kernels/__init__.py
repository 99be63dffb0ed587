"""effssl_kernels: GPU kernels that turn efficient-SSL methods (SimWnW, EMP-SSL, ...) into wall-clock savings.

Layers: kernels (csrc/, effssl_kernels/triton/) -> ops (effssl_kernels/ops/) -> autograd -> nn,
with a plain-PyTorch reference of every op in effssl_kernels/reference/.
"""
from . import _backend
from .losses import tcr_loss
from .emp_ssl import bag_of_features, emp_ssl_loss, emp_ssl_patches
from .masks import BlockMask
from .nn import (
    block_mask,
    is_sparse,
    is_sparse_vit,
    masked_checkpoint,
    patch_size,
    sparsify,
    sparsify_vit,
    tile_plan,
    token_keep,
    unsparsify,
    unsparsify_vit,
)
from .ops import block_match, gather_tokens, multi_crop, patch_embed_gather, similar_blocks
from .patch_scaling import resize_patch_embed, resize_pos_embed
from .photometric import PhotometricParams, PhotometricSampler, photometric
from .pipeline import CropGroup, MultiViewAugment, MultiViews
from .sparse import PackedMap, TileIndex, sparse_conv2d, sparse_conv2d_packed
from .schedule import AccelerationSchedule
from .simwnw import SimWnW, SimWnWMasks, SimWnWViews, simwnw_masks
from .tokens import keep_buckets, random_token_keep, similar_token_keep, tokens_from_psnr
from .transforms import TwoViewCrop, TwoViews, crop_centers, random_crops, random_resized_boxes

__version__ = "0.1.0"

__all__ = [
    # SimWnW block search (issue 2)
    "block_match", "similar_blocks", "crop_centers", "TwoViewCrop", "TwoViews",
    # ViT token removal (issue 4)
    "gather_tokens", "patch_embed_gather", "random_token_keep", "similar_token_keep",
    "resize_patch_embed", "resize_pos_embed",
    "sparsify_vit", "unsparsify_vit", "token_keep", "patch_size", "is_sparse_vit",
    # block-sparse convolution (issue 3; plain-PyTorch tile kernels so far)
    "BlockMask", "TileIndex", "PackedMap", "sparse_conv2d", "sparse_conv2d_packed",
    "sparsify", "unsparsify", "block_mask", "masked_checkpoint", "is_sparse", "tile_plan",
    # EMP-SSL (issue 6)
    "tcr_loss", "AccelerationSchedule", "emp_ssl_loss", "emp_ssl_patches", "bag_of_features",
    # SimWnW / EMP-SSL pipeline (issue 5)
    "multi_crop", "random_crops", "random_resized_boxes", "SimWnW", "SimWnWMasks", "SimWnWViews", "simwnw_masks",
    "tokens_from_psnr", "keep_buckets",
    # photometric augmentations (issue 7)
    "PhotometricParams", "PhotometricSampler", "photometric", "CropGroup", "MultiViewAugment", "MultiViews",
    "__version__",
]
