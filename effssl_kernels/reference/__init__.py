"""Plain-PyTorch references: the oracle of every test and the baseline of every benchmark."""
from .block_match import block_match_reference, candidate_order

__all__ = ["block_match_reference", "candidate_order"]
