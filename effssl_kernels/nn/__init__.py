"""Drop-in modules and model converters built on the ops."""
from .vit import is_sparse_vit, patch_size, sparsify_vit, token_keep, unsparsify_vit

__all__ = ["sparsify_vit", "unsparsify_vit", "token_keep", "patch_size", "is_sparse_vit"]
