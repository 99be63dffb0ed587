"""Public functions: the only code that calls the compiled extension or launches Triton."""
from .block_match import block_match, similar_blocks

__all__ = ["block_match", "similar_blocks"]
