"""EMP-SSL (Tong et al. 2023): many crops per image, one epoch, total coding rate + invariance.

A step (shared/seeds/001_c2fdba03c4bcd6a8.txt, and EMP-SSL's public code):

1. :func:`emp_ssl_patches`: ``P`` (20 to 200) RandomResizedCrop + flip patches per image,
   made on the device by ``multi_crop`` (at most eight launches), patch-major (``[P * N, C, s, s]``: patch
   ``i`` of every image, then patch ``i + 1``), so that ``z.view(P, N, d)`` are EMP-SSL's
   ``z_list`` chunks.
2. The encoder (a plain model, or one converted by ``effssl_kernels.sparsify`` and run under
   ``block_mask``) embeds all patches in one batch.
3. :func:`emp_ssl_loss`: with ``Z_i`` the L2-normalised embeddings of patch ``i`` of the ``N``
   images and ``Zbar`` their mean over patches (per image),

       loss = -lam * mean_i mean_n cos(Z_i[n], Zbar[n])  -  mean_i R(Z_i),
       R(Z) = 0.5 * logdet(I + d / (N eps^2) Z^T Z)       (``tcr_loss``, all P groups batched)

   EMP-SSL's settings are the defaults: ``lam = 200`` (its ``patch_sim``) and ``eps^2 = 0.2``
   (the paper's; its code writes ``d / (N * eps)`` with ``eps = 0.2``), i.e. ``eps = sqrt(0.2)``
   here, where ``eps`` is squared as in ``tcr_loss`` (whose own default, ``eps = 0.2``, is
   ``eps^2 = 0.04``).
4. Evaluation: :func:`bag_of_features`, the mean over patches of each image's embedding.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import as_pair, finite_number, int_arg
from .losses import _IN_DTYPES, tcr_loss
from .ops.multi_crop import multi_crop
from .transforms import check_out_dtype, random_resized_boxes

__all__ = ["emp_ssl_patches", "emp_ssl_loss", "bag_of_features"]


@torch.no_grad()
def emp_ssl_patches(
    images: Tensor,
    num_patches: int,
    size: Union[int, Sequence[int]],
    *,
    scale: Sequence[float] = (0.25, 0.25),
    ratio: Sequence[float] = (1.0, 1.0),
    hflip_p: float = 0.5,
    generator: Optional[torch.Generator] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``num_patches`` crop-resize-flip patches of every image, in at most eight ``multi_crop`` launches
    written straight into the patch-major output (peak memory: the output and an eighth; a
    quarter for uint8 images to bf16/fp16, whose chunks are cropped in float32 so each value is
    rounded once).

    Args:
        images: ``[N, C, H, W]`` on any device (uint8 gives float32 in ``[0, 1]``; a float image
            keeps its dtype and values).
        num_patches: ``P`` (EMP-SSL: 20 to 200). size: patch side(s).
        scale, ratio, hflip_p: the RandomResizedCrop/flip parameters (defaults: EMP-SSL's CIFAR
            recipe, ``RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1, 1))``: square quarters).
            generator: CPU ``torch.Generator`` for the boxes.
        out_dtype: None, float32, float16, bfloat16 or the float images' dtype (uint8 images
            give float32 by default), as :func:`~effssl_kernels.transforms.random_crops`.

    Returns:
        ``[P * N, C, s, s]`` patch-major: row ``i * N + n`` is patch ``i`` of image ``n``.
        Photometric augmentations are the caller's (per patch, after this).

    Raises:
        ValueError for images that are not ``[N, C, H, W]``, ``num_patches < 1`` or bad crop
        parameters; TypeError for a non-int ``num_patches`` or an ``out_dtype`` it cannot make.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError("emp_ssl_patches: images must be a [N, C, H, W] tensor")
    P = int_arg("num_patches", "emp_ssl_patches", num_patches, 1)
    check_out_dtype(images, out_dtype, "emp_ssl_patches")
    N = images.shape[0]
    boxes, flips = random_resized_boxes(N, P, tuple(images.shape[-2:]), scale, ratio, hflip_p,
                                        generator=generator, device=images.device)
    u8 = images.dtype == torch.uint8
    dtype = (out_dtype or torch.float32) if u8 else (out_dtype or images.dtype)
    s = as_pair(size, "emp_ssl_patches: size")
    out = torch.empty((P, N, images.shape[1], *s), dtype=dtype, device=images.device)
    # multi_crop is image-major ([N, k, ...]) and EMP-SSL patch-major: crop _CHUNKS groups of
    # patches, each copied (and scaled) into its rows, so the peak is the output plus one group,
    # not two whole copies of it (12,800 patches of 224 px are 7.7 GB in float32)
    k = -(-P // _CHUNKS)
    for i in range(0, P, k):
        j = min(i + k, P)
        # uint8: cropped to float32, scaled and rounded to dtype once (cropping to bf16/fp16
        # rounded before the scale too: one more step of error in a quarter of the values)
        c = multi_crop(images, boxes[:, i:j].contiguous(), flips[:, i:j].contiguous(), s,
                       out_dtype=torch.float32 if u8 else dtype)
        c = c.view(N, j - i, *c.shape[1:]).transpose(0, 1)
        if u8:
            torch.mul(c, 1.0 / 255, out=out[i:j])
        else:
            out[i:j].copy_(c)
    return out.view(P * N, *out.shape[2:])


_CHUNKS = 8  # multi_crop launches per emp_ssl_patches call


EMP_SSL_EPS = 0.2 ** 0.5  # eps^2 = 0.2: EMP-SSL's paper, and its code's d / (N * 0.2)


def emp_ssl_loss(z: Tensor, num_patches: int, *, lam: float = 200.0, eps: float = EMP_SSL_EPS,
                 normalize: bool = True, check: bool = True) -> tuple[Tensor, dict]:
    """EMP-SSL's loss of patch-major embeddings.

    Args:
        z: ``[P * N, d]`` (patch-major, as :func:`emp_ssl_patches` orders the patches) or
            ``[P, N, d]``, any float dtype.
        num_patches: ``P``. lam: weight of the invariance term. eps: the coding rate's
            distortion, squared in the formula: the default ``sqrt(0.2)`` is EMP-SSL's
            ``eps^2 = 0.2`` (module docstring).
        normalize: L2-normalise each embedding first (EMP-SSL normalises its projector output;
            pass False if yours already is). check: ``tcr_loss``'s positive-definiteness check
            (one host sync; False for asynchronous loops and ``torch.compile``).

    Returns:
        ``(loss, parts)``: the scalar loss (float32, or float64 for float64 ``z``) and
        ``{"invariance": mean cosine to the patch mean, "tcr": mean coding rate}``, detached.

    Raises:
        TypeError for a non-float ``z`` or non-number ``num_patches``/``lam``/``eps``;
        ValueError for shapes that are not ``P`` groups, non-finite ``lam``/``eps``, ``eps <= 0``,
        and (``check``) a coding-rate matrix that is not positive definite (NaN/inf in ``z``).
    """
    if not isinstance(z, Tensor) or z.dim() not in (2, 3):
        raise ValueError("emp_ssl_loss: z must be [P * N, d] or [P, N, d]")
    if z.dtype not in _IN_DTYPES:
        raise TypeError(f"emp_ssl_loss: z must be float16, bfloat16, float32 or float64, got {z.dtype}")
    lam = finite_number("lam", "emp_ssl_loss", lam)
    eps = finite_number("eps", "emp_ssl_loss", eps)  # a float: tcr_loss takes no NumPy scalars
    if eps <= 0:
        raise ValueError(f"emp_ssl_loss: eps must be > 0, got {eps}")
    num_patches = int_arg("num_patches", "emp_ssl_loss", num_patches, 1)
    if z.dim() == 2:
        if z.shape[0] % num_patches:
            raise ValueError(f"emp_ssl_loss: {z.shape[0]} rows are not {num_patches} patches of N images")
        z = z.view(num_patches, z.shape[0] // num_patches, z.shape[1])
    elif z.shape[0] != num_patches:
        raise ValueError(f"emp_ssl_loss: z has {z.shape[0]} patch groups, num_patches is {num_patches}")
    # In float32 at least: F.normalize's eps (1e-12) is 0 in float16, so a zero row (a ReLU
    # projector's, under AMP) would become 0/0 = NaN; tcr_loss computes in float32 anyway.
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    z = z.to(acc)
    if normalize:
        z = F.normalize(z, dim=-1)
    zbar = z.mean(0, keepdim=True)
    if normalize:  # unit rows: the cosine is a dot with the normalised mean (not z again)
        sim = (z * F.normalize(zbar, dim=-1)).sum(-1).mean()
    else:
        sim = F.cosine_similarity(z, zbar, dim=-1).mean()  # mean over patches and images
    rate = tcr_loss(z, eps, check=check).mean()  # [P] groups in one batched factorisation
    loss = -lam * sim - rate
    return loss, {"invariance": sim.detach(), "tcr": rate.detach()}


@torch.no_grad()
def bag_of_features(model: nn.Module, images: Tensor, num_patches: int, size: Union[int, Sequence[int]],
                    *, chunk: int = 0, **patch_kw) -> Tensor:
    """EMP-SSL's evaluation embedding: the mean of ``model`` over ``num_patches`` patches of each
    image (``[N, d]``). ``chunk`` (> 0) runs the model on that many patches at a time to bound
    memory (0: all at once); ``patch_kw`` go to :func:`emp_ssl_patches` (e.g. ``scale``,
    ``generator``). ``model`` is called as given: put it in eval mode first. Errors as
    :func:`emp_ssl_patches`; TypeError/ValueError for a non-int or negative ``chunk``."""
    chunk = int_arg("chunk", "bag_of_features", chunk, 0)  # a NumPy int: Tensor.split takes ints only
    patches = emp_ssl_patches(images, num_patches, size, **patch_kw)  # checks images first
    N = images.shape[0]
    if chunk > 0:
        z = torch.cat([model(p) for p in patches.split(chunk)])
    else:
        z = model(patches)
    return z.reshape(num_patches, N, -1).mean(0)
