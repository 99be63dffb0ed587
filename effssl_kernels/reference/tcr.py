"""Plain-PyTorch reference of EMP-SSL's total coding rate, the oracle of ``tcr_loss``."""
from __future__ import annotations

import torch
from torch import Tensor


def _coding_rate(z: Tensor, eps: float) -> Tensor:
    b, d = z.shape
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    return 0.5 * torch.logdet(eye + (d / (b * eps**2)) * (z.T @ z))


def tcr_loss_reference(z: Tensor, eps: float = 0.2) -> Tensor:
    """``R(Z) = 0.5 * logdet(I_d + d / (b * eps^2) * Z^T Z)`` on the ``d x d`` matrix, as EMP-SSL's
    code computes it (``torch.logdet``, an LU factorisation, whatever ``b``).

    z ``[b, d]`` -> 0-d, or ``[P, b, d]`` -> ``[P]``, one patch group at a time as EMP-SSL's
    ``cal_TCR`` loops over its patch chunks. (A batched ``torch.logdet`` would also trip a torch
    CPU bug: batched LU of matrices larger than 14 x 14 runs MKL's getrf on several threads at
    once and returns corrupt pivots, so wrong log-determinants or a "Pivots given to lu_solve"
    error, once ``torch.set_num_threads(n > 1)`` has been called; pytorch/pytorch#142815, fixed by
    PR #181570.) Computed in z's dtype when it is float32 or float64; float16/bfloat16 are upcast
    to float32 first, since ``torch.logdet`` has no half-precision kernels. Rows are used as given
    (EMP-SSL normalises them before the loss). Differentiable through autograd. EMP-SSL's code
    writes ``d / (b * eps)`` with ``eps = 0.2``: this function squares ``eps`` as the paper does, so
    ``tcr_loss_reference(z, eps=math.sqrt(e))`` is EMP-SSL's ``TotalCodingRate(eps=e)`` value.
    """
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    if z.dim() == 2:
        return _coding_rate(z, eps)
    if z.shape[0] == 0:
        return z.sum(dim=(-2, -1))  # [0], still attached to z's graph
    return torch.stack([_coding_rate(zi, eps) for zi in z.unbind(0)])
