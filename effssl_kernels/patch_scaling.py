"""Patch scaling (FlexiViT): run one ViT at several patch sizes by resizing its embedding weights.

``resize_patch_embed`` is FlexiViT's pseudo-inverse (PI) resize: with ``R`` the linear map that
resizes a ``p x p`` patch to ``p' x p'`` (``F.interpolate`` of each one-hot basis patch), the
new kernel is ``w' = pinv(R)^T w``, so that ``<R x, w'> == <x, w>`` for every patch ``x`` when
``p' >= p`` (``R`` has full column rank): a token computed from an upsampled patch with the
resized kernel equals the original token. ``resize_pos_embed`` interpolates the positional
embedding to a new grid as timm's ``resample_abs_pos_embed`` does. Both are differentiable, so
gradients reach the original parameters; use them through ``effssl_kernels.patch_size``.
"""
from __future__ import annotations

import threading
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import as_pair, build_for_cache, int_arg

__all__ = ["resize_patch_embed", "resize_pos_embed", "resize_matrix_pinv", "clear_resize_cache"]

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")
_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()




def _resize_matrix(old: tuple[int, int], new: tuple[int, int], interpolation: str, antialias: bool) -> Tensor:
    """float64 ``[new_h*new_w, old_h*old_w]``: column ``j`` is basis patch ``j`` resized."""
    basis = torch.eye(old[0] * old[1], dtype=torch.float64).reshape(-1, 1, old[0], old[1])
    kw = {} if interpolation in ("nearest", "area") else dict(align_corners=False, antialias=antialias)
    resized = F.interpolate(basis, size=new, mode=interpolation, **kw)
    return resized.reshape(old[0] * old[1], new[0] * new[1]).T


def _pinv(R: Tensor) -> Tensor:
    """Moore-Penrose inverse of a float64 resize matrix.

    Resizes up (or down) have full column (or row) rank, where the normal equations give the
    pinv with one small solve, many times faster than an SVD on a busy CPU; the result is
    verified (all four Penrose conditions: with R rank-deficient, as for some mixed up/down
    sizes such as 4x4 -> 5x2, the solve can succeed with a generalised inverse that is not the
    minimum-norm one, which only the symmetry of RP and PR tells apart) and an SVD-based
    ``torch.linalg.pinv`` is the fallback.
    """
    m, n = R.shape
    try:
        if m >= n:
            P = torch.linalg.solve(R.T @ R, R.T)
        else:
            P = torch.linalg.solve(R @ R.T, R).T
        RP, PR = R @ P, P @ R
        ok = (torch.allclose(RP @ R, R, rtol=0, atol=1e-10) and torch.allclose(PR @ P, P, rtol=0, atol=1e-8)
              and torch.allclose(RP, RP.T, rtol=0, atol=1e-10) and torch.allclose(PR, PR.T, rtol=0, atol=1e-10))
    except RuntimeError:  # singular
        ok = False
    return P if ok else torch.linalg.pinv(R)


def resize_matrix_pinv(
    old_size, new_size, *, interpolation: str = "bilinear", antialias: bool = False,
    device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``pinv(R)`` ``[old_h*old_w, new_h*new_w]`` of the patch resize ``R``, cached.

    Computed once in float64 on the CPU per ``(old, new, interpolation, antialias)`` and kept
    per ``(device, dtype)``; ``clear_resize_cache()`` empties the cache.
    """
    fn = "resize_matrix_pinv"
    old, new = as_pair(old_size, f"{fn}: old_size"), as_pair(new_size, f"{fn}: new_size")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"{fn}: interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    device = torch.device(device)
    key = (old, new, interpolation, bool(antialias), device, dtype)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    if torch.compiler.is_compiling():
        # Inside a trace: compute (traced) without storing a traced tensor in the cache; run once
        # eagerly (e.g. by entering effssl_kernels.patch_size outside the compiled region) to warm it.
        return _pinv(_resize_matrix(old, new, interpolation, antialias)).to(device, dtype)
    base_key = (old, new, interpolation, bool(antialias), torch.device("cpu"), torch.float64)

    def build():
        base = _CACHE.get(base_key)
        if base is None:
            base = _CACHE[base_key] = _pinv(_resize_matrix(old, new, interpolation, antialias))
        return base.to(device=device, dtype=dtype)

    # Outside inference mode (build_for_cache): a first call under torch.inference_mode()
    # (evaluating at another patch size) must not break later training steps at that size.
    with _CACHE_LOCK:
        out = _CACHE[key] = build_for_cache(build)
    return out


def clear_resize_cache() -> None:
    """Forget every cached ``pinv(R)``."""
    with _CACHE_LOCK:
        _CACHE.clear()


def resize_patch_embed(
    weight: Tensor,
    new_patch_size: Union[int, Sequence[int]],
    *,
    interpolation: str = "bilinear",
    antialias: bool = False,
) -> Tensor:
    """PI-resize a patch-embedding kernel to another patch size (FlexiViT).

    Args:
        weight: ``[D, C, p_h, p_w]`` float (a conv kernel with kernel = stride = patch).
        new_patch_size: ``p'`` or ``(p'_h, p'_w)``.
        interpolation, antialias: the resize ``R`` the kernel is matched to (FlexiViT/big_vision:
            bilinear without antialias; timm's ``resample_patch_embed`` defaults to bicubic with
            antialias).

    Returns:
        ``[D, C, p'_h, p'_w]`` in ``weight``'s dtype: ``weight.reshape(D*C, p*p) @ pinv(R)``,
        computed in float32 (float64 for float64 weights) with autocast off. The same tensor
        when the size does not change. Differentiable: gradients flow to ``weight``.

    For ``p' >= p``: ``<resize(x), w'> == <x, w>`` for every patch ``x``. For ``p' < p``, ``R``
    loses information and ``w'`` is the minimum-norm least-squares match (FlexiViT's choice).

    Raises TypeError / ValueError for a non-4-D or non-float weight, a bad size or interpolation.
    """
    fn = "resize_patch_embed"
    if not isinstance(weight, Tensor):
        raise TypeError(f"{fn}: weight must be a tensor")
    if weight.dim() != 4:
        raise ValueError(f"{fn}: weight must be 4-D [D, C, p, p], got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{fn}: weight must be floating point, got {weight.dtype}")
    new = as_pair(new_patch_size, f"{fn}: new_patch_size")
    old = (weight.shape[-2], weight.shape[-1])
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"{fn}: interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    if new == old:
        return weight
    ct = torch.float64 if weight.dtype == torch.float64 else torch.float32
    pinv = resize_matrix_pinv(
        old, new, interpolation=interpolation, antialias=antialias, device=weight.device, dtype=ct
    )
    D, C = weight.shape[:2]
    # bf16 autocast would round the matmul; the resized kernel is a parameter, keep it exact.
    with torch.autocast(device_type=weight.device.type, enabled=False):
        out = weight.reshape(D * C, old[0] * old[1]).to(ct) @ pinv
    return out.reshape(D, C, new[0], new[1]).to(weight.dtype)


def resize_pos_embed(
    pos_embed: Tensor,
    old_grid: Union[int, Sequence[int]],
    new_grid: Union[int, Sequence[int]],
    num_prefix_tokens: int = 0,
    *,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Interpolate a learned absolute positional embedding to another patch grid.

    Args:
        pos_embed: ``[1, P + gh*gw, D]`` (or ``[P + gh*gw, D]``): ``P = num_prefix_tokens``
            entries (cls, registers; left untouched) then the patch grid in row-major order.
        old_grid: ``(gh, gw)`` of ``pos_embed``; new_grid: the target ``(gh', gw')``.
        interpolation, antialias: as timm's ``resample_abs_pos_embed`` (bicubic, antialias).

    Returns:
        ``[1, P + gh'*gw', D]`` (2-D in, 2-D out) in ``pos_embed``'s dtype, interpolated in
        float32 as timm does (float64 in float64); ``pos_embed`` itself when the grid does not change.
        Differentiable. Matches ``timm.layers.resample_abs_pos_embed``.

    Raises TypeError / ValueError when the length does not match ``P + gh*gw`` or on bad sizes.
    """
    fn = "resize_pos_embed"
    if not isinstance(pos_embed, Tensor) or not pos_embed.is_floating_point():
        raise TypeError(f"{fn}: pos_embed must be a floating-point tensor")
    if pos_embed.dim() not in (2, 3) or (pos_embed.dim() == 3 and pos_embed.shape[0] != 1):
        raise ValueError(f"{fn}: pos_embed must be [1, L, D] or [L, D], got {tuple(pos_embed.shape)}")
    old, new = as_pair(old_grid, f"{fn}: old_grid"), as_pair(new_grid, f"{fn}: new_grid")
    num_prefix_tokens = int_arg("num_prefix_tokens", fn, num_prefix_tokens, 0)  # NumPy ints too
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"{fn}: interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    two_d = pos_embed.dim() == 2
    pe = pos_embed.unsqueeze(0) if two_d else pos_embed
    L, D = pe.shape[1], pe.shape[2]
    if L != num_prefix_tokens + old[0] * old[1]:
        raise ValueError(
            f"{fn}: pos_embed has {L} entries, expected num_prefix_tokens + gh*gw = "
            f"{num_prefix_tokens} + {old[0]}*{old[1]}"
        )
    if new == old:
        return pos_embed
    prefix, grid = pe[:, :num_prefix_tokens], pe[:, num_prefix_tokens:]
    kw = {} if interpolation in ("nearest", "area") else dict(align_corners=False, antialias=antialias)
    # float32 as timm (which matches bit for bit); float64 stays float64 (gradcheck, exact tests)
    g = grid if grid.dtype == torch.float64 else grid.float()
    g = g.reshape(1, old[0], old[1], D).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=new, mode=interpolation, **kw)
    g = g.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], D).to(pe.dtype)
    out = torch.cat((prefix, g), dim=1) if num_prefix_tokens else g
    return out[0] if two_d else out
