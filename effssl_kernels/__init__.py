"""effssl_kernels: GPU kernels that turn efficient-SSL methods (SimWnW, EMP-SSL, ...) into wall-clock savings.

Layers: kernels (csrc/, effssl_kernels/triton/) -> ops (effssl_kernels/ops/) -> autograd -> nn,
with a plain-PyTorch reference of every op in effssl_kernels/reference/.
"""
from . import _backend
from .ops import block_match, similar_blocks
from .transforms import TwoViewCrop, TwoViews, crop_centers

__version__ = "0.1.0"

__all__ = ["block_match", "similar_blocks", "crop_centers", "TwoViewCrop", "TwoViews", "__version__"]
