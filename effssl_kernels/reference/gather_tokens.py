"""Plain-PyTorch references of the token ops (SEMANTICS.md section 3)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _pos_2d(pos_embed: Tensor) -> Tensor:
    """``[1, L, D]`` or ``[L, D]`` -> ``[L, D]``."""
    return pos_embed.reshape(pos_embed.shape[-2], pos_embed.shape[-1])


def gather_tokens_reference(x: Tensor, keep: Tensor, pos_embed: Optional[Tensor] = None) -> Tensor:
    """``out[n, k] = x[n, keep[n, k]] + pos_embed[keep[n, k]]``: x ``[N, L, D]``, keep int ``[N, K]``
    -> ``[N, K, D]`` in the promoted dtype of x and pos_embed. Differentiable (autograd)."""
    out = x.gather(1, keep.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    if pos_embed is not None:
        out = out + _pos_2d(pos_embed)[keep.long()]
    return out


def patch_embed_reference(images: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """timm's PatchEmbed: conv with kernel = stride = p, flattened to ``[N, L, D]`` (row-major
    patches), computed in the promoted dtype of images, weight and bias."""
    dt = torch.promote_types(images.dtype, weight.dtype)
    if bias is not None:
        dt = torch.promote_types(dt, bias.dtype)
    p = weight.shape[-1]
    if images.shape[1] == 0:  # F.conv2d gives 0 output channels here; a sum over no channels is 0
        N, _, H, W = images.shape
        y = images.new_zeros((N, weight.shape[0], H // p, W // p), dtype=dt)
        if bias is not None:
            y = y + bias.to(dt).view(1, -1, 1, 1)
    else:
        y = F.conv2d(images.to(dt), weight.to(dt), None if bias is None else bias.to(dt), stride=p)
    return y.flatten(2).transpose(1, 2)


def patch_embed_gather_reference(
    images: Tensor, weight: Tensor, bias: Optional[Tensor], keep: Tensor, pos_embed: Optional[Tensor] = None
) -> Tensor:
    """``gather_tokens(patch_embed(images), keep, pos_embed)``: images ``[N, C, H, W]``, weight
    ``[D, C, p, p]``, keep ``[N, K]`` over the ``L = (H/p)(W/p)`` patches -> ``[N, K, D]``."""
    return gather_tokens_reference(patch_embed_reference(images, weight, bias), keep, pos_embed)
