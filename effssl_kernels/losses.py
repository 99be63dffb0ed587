"""Losses of efficient-SSL methods: EMP-SSL's total coding rate, ``tcr_loss``.

``R(Z) = 0.5 * logdet(I_d + c * Z^T Z)`` with ``c = d / (b * eps^2)``, for ``b`` embeddings of
width ``d`` (the rows of ``Z``), per patch group. EMP-SSL maximises it, so its training loss
carries ``-tcr_loss(z)``. Plain PyTorch (no compiled kernel): a matmul, a Cholesky and a custom
backward, on any device torch's linear algebra supports.

Gram side. The two Gram matrices share their nonzero eigenvalues, so
``logdet(I_d + c Z^T Z) = logdet(I_b + c Z Z^T)`` (Sylvester's determinant identity), and the
smaller one is factored: ``b x b`` when ``b <= d`` (EMP-SSL: a batch of 100 images and d = 1024
gives 100 x 100 instead of 1024 x 1024), else ``d x d``. The Gram matmul then costs
``2 * n^2 * m`` flops and the factorisation ``n^3 / 3``, with ``n = min(b, d)``, ``m = max(b, d)``.

Cholesky, not LU. The matrix is symmetric with every eigenvalue >= 1, so ``torch.linalg.cholesky_ex``
factors it without pivoting at half LU's cost, and ``logdet = 2 * sum(log(diag(L)))`` is a sum of
logs of positive numbers (``torch.logdet`` returns NaN when rounding makes an LU determinant
negative). Its condition number is at most ``1 + c * ||Z||_2^2 <= 1 + d / eps^2`` for unit rows
(``||Z||_2^2 <= ||Z||_F^2 = b``), about 2.6e4 for d = 1024 and eps = 0.2: float32 suffices.

Dtype policy. The Gram matmul and the Cholesky run in float32 (float64 for float64 input, or what
``compute_dtype`` names): a float16/bfloat16 input is upcast *before* the matmul, since a
half-precision Gram rounds every entry to 11 (float16) or 8 (bfloat16) significant bits, an
error the log-determinant adds up over ``n`` eigenvalues (python_tests/test_tcr_loss.py measures
it at 10x and more of ours). Autocast is switched off inside (AMP would run the matmul in half precision again).
The result is in the compute dtype; the gradient comes back in ``z``'s dtype. On CUDA the float32
matmul follows torch's matmul precision setting (TF32 when ``allow_tf32`` is on).

Sync policy. ``check=True`` (default) reads one bool back to the host (a device synchronisation on
CUDA) to raise ValueError when a factorisation failed. ``check=False`` never synchronises: a
group whose Cholesky failed (``info != 0``) or whose log-determinant is not finite gives NaN. Use
it in asynchronous training loops and under ``torch.compile(fullgraph=True)``, where the check is
a data-dependent branch (a graph break, which fullgraph refuses).

Backward. ``dR/dZ = c * (I_b + c Z Z^T)^{-1} Z`` (b side) or ``c * Z (I_d + c Z^T Z)^{-1}`` (d side),
from the saved factor: ``cholesky_inverse`` (``n x n``) and one GEMM. Autograd through
``cholesky_ex`` and the Gram matmul instead runs two ``n x n`` triangular solves and two GEMMs; the
closed form measured 1.35x / 1.74x / 2.39x faster forward+backward on a 2-core CPU for d = 1024
and b = 256, 1024 or 20 groups of 100, on par at b = 64 (bench/bench_tcr_loss.py; the committed
bench/results/cpu/tcr_loss.json). Under ``create_graph=True``
the backward refactors G from z with differentiable ops, so double backward is correct (in eager
mode; a torch.compile'd backward is not differentiable again), at the cost of a second Gram
matmul and Cholesky.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

_IN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COMPUTE_DTYPES = (torch.float32, torch.float64)


def _autocast_types() -> frozenset:
    # asked once, at import: Dynamo before torch 2.14 cannot trace torch.amp.is_autocast_available
    names = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "ipu", "mtia", "maia",
             torch._C._get_privateuse1_backend_name())
    found = set()
    for name in names:
        try:
            if torch.amp.is_autocast_available(name):
                found.add(name)
        except RuntimeError:  # a device type this torch does not know
            pass
    return frozenset(found)


_AUTOCAST_TYPES = _autocast_types()


def _no_autocast(device_type: str):
    # AMP would cast the Gram matmul back to half precision; the upcast is the point of the dtype
    # policy. Every device type with an autocast (cpu, cuda, xpu, mps, ...) has it switched off;
    # the others (meta) have none to switch off.
    if device_type in _AUTOCAST_TYPES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _gram(z: Tensor, c: float, b_side: bool) -> Tensor:
    """``I_b + c Z Z^T`` ``[P, b, b]`` or ``I_d + c Z^T Z`` ``[P, d, d]`` from z ``[P, b, d]``, one baddbmm."""
    n = z.shape[-2] if b_side else z.shape[-1]
    eye = torch.eye(n, dtype=z.dtype, device=z.device)  # broadcast over P by baddbmm
    if b_side:
        return torch.baddbmm(eye, z, z.mT, alpha=c)
    return torch.baddbmm(eye, z.mT, z, alpha=c)


class _TotalCodingRate(torch.autograd.Function):
    """z ``[P, b, d]`` in the compute dtype -> ``[P]`` rates; NaN where the Cholesky failed."""

    @staticmethod
    def forward(ctx, z: Tensor, c: float, b_side: bool) -> Tensor:
        with _no_autocast(z.device.type):
            L, info = torch.linalg.cholesky_ex(_gram(z, c, b_side))
            # 0.5 * logdet(G) = 0.5 * 2 * sum(log(diag(L)))
            r = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            # a failed factorisation leaves L partly unwritten: never return a finite value from it
            ok = (info == 0) & torch.isfinite(r)
            r = torch.where(ok, r, float("nan"))
        ctx.save_for_backward(z, L, ok)
        ctx.c = c
        ctx.b_side = b_side
        return r

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, L, ok = ctx.saved_tensors
        with _no_autocast(z.device.type):
            if torch.is_grad_enabled():
                # create_graph=True: refactor from z through differentiable ops so that a double
                # backward sees G's dependence on z (the saved L is a constant to autograd)
                L = torch.linalg.cholesky_ex(_gram(z, ctx.c, ctx.b_side)).L
            # G^{-1} scaled by c * grad per group: the n x n factor is the smaller operand to scale;
            # a failed group's G^{-1} is NaN, so its gradient is NaN like its value
            ginv = torch.cholesky_inverse(L) * (ctx.c * grad)[:, None, None]
            ginv = torch.where(ok[:, None, None], ginv, float("nan"))
            gz = ginv @ z if ctx.b_side else z @ ginv
        return gz, None, None


def _check(z, eps, check, compute_dtype) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"tcr_loss: z must be a tensor, got {type(z).__name__}")
    if z.dtype not in _IN_DTYPES:
        raise TypeError(f"tcr_loss: z must be float16, bfloat16, float32 or float64, got {z.dtype}")
    if z.dim() not in (2, 3):
        raise ValueError(f"tcr_loss: z must be 2-D [b, d] or 3-D [P, b, d], got shape {tuple(z.shape)}")
    if z.shape[-2] == 0 or z.shape[-1] == 0:
        raise ValueError(f"tcr_loss: z needs b >= 1 rows and d >= 1 columns, got shape {tuple(z.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"tcr_loss: eps must be a Python float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"tcr_loss: eps must be finite and > 0, got {eps}")
    if not isinstance(check, bool):
        raise TypeError(f"tcr_loss: check must be a bool, got {type(check).__name__}")
    if compute_dtype is not None and compute_dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"tcr_loss: compute_dtype must be None, torch.float32 or torch.float64, got {compute_dtype}")


def _raise_if_failed(r: Tensor, z: Tensor, dtype: torch.dtype) -> None:
    failed = torch.isnan(r)
    if not bool(failed.any()):  # the one host sync of check=True
        return
    where = "" if z.dim() == 2 else f" for patch group(s) {failed.nonzero().flatten().tolist()[:8]} of {r.shape[0]}"
    if not bool(torch.isfinite(z).all()):
        cause = "z has NaN or inf entries"
    else:
        cause = (f"z's entries are too large for {dtype} (EMP-SSL L2-normalises the rows first; "
                 "compute_dtype=torch.float64 has more range)")
    raise ValueError(
        f"tcr_loss: I + c*Z*Z^T is not positive definite in {dtype}{where} (its Cholesky "
        f"factorisation failed or gave a non-finite log-determinant): {cause}. check=False returns "
        "NaN there instead, without this check's host sync."
    )


def tcr_loss(z: Tensor, eps: float = 0.2, *, check: bool = True,
             compute_dtype: torch.dtype | None = None) -> Tensor:
    """EMP-SSL's total coding rate ``R(Z) = 0.5 * logdet(I_d + d / (b * eps^2) * Z^T Z)``.

    Computed on the smaller Gram matrix (``b x b`` when ``b <= d``) through a Cholesky
    factorisation; see the module docstring for the side, dtype and sync policies. EMP-SSL
    maximises R: its loss term is ``-tcr_loss(z)``, averaged over patch groups, e.g.
    ``-tcr_loss(z_proj.view(P, b, d)).mean()`` for EMP-SSL's ``[P * b, d]`` projections (patch
    major, as its ``chunk(num_patches)``).

    ``eps`` is squared here, as in the paper's formula. EMP-SSL's setting is ``eps^2 = 0.2`` (its
    code writes ``scalar = d / (b * eps)`` with ``eps = 0.2``): ``tcr_loss(z, eps=math.sqrt(0.2))``
    reproduces its value, as ``emp_ssl_loss`` does by default; this function's own default
    ``eps=0.2`` is ``eps^2 = 0.04``.

    Args:
        z: ``[b, d]`` or ``[P, b, d]`` (P patch groups of b embeddings of width d; ``b, d >= 1``,
            ``P >= 0``), float16, bfloat16, float32 or float64, any strides, any device with
            torch linear algebra. Rows are used as given: L2-normalise them first, as EMP-SSL does.
        eps: distortion, a finite Python float > 0.
        check: raise ValueError if a factorisation failed (one host sync; see below).
        compute_dtype: ``torch.float32`` or ``torch.float64`` for the Gram matmul and Cholesky;
            None: float64 for float64 input, float32 otherwise (half input is upcast).

    Returns:
        A 0-d tensor for ``[b, d]`` input, ``[P]`` for ``[P, b, d]``, in the compute dtype. The
        gradient (``c * (I_b + c Z Z^T)^{-1} Z``, ``c = d / (b * eps^2)``) comes back in z's dtype.
        Twice differentiable in eager mode (``create_graph=True`` refactors G differentiably).

    Raises:
        TypeError: z not a tensor or not a floating dtype (integer, complex); eps not a number;
            check not a bool; compute_dtype not None/float32/float64.
        ValueError: z not 2-D or 3-D; b == 0 or d == 0; eps <= 0 or not finite; with
            ``check=True``, a matrix that is not positive definite in the compute dtype (NaN or
            inf in z, or entries so large the Gram overflows). With ``check=False`` those groups
            give NaN instead (and a NaN gradient), and nothing synchronises: the mode to use under
            ``torch.compile(fullgraph=True)``.

    Matches ``effssl_kernels.reference.tcr_loss_reference`` (the direct ``d x d`` ``torch.logdet``
    of EMP-SSL's code) run in float64: float64 values within 1e-10 relative and gradients within
    1e-9 of the largest entry; float32 values within 1e-5 relative (measured <= 1.5e-7) and
    gradients within 1e-4 of the largest entry (measured <= 3e-5), for L2-normalised rows, b and d
    up to 1024, eps 0.05 to 0.5. Collapsed embeddings (near-identical rows) make G ill-conditioned
    (float32 gradients then off by percents, as the plain formula's): use
    ``compute_dtype=torch.float64`` there.
    """
    _check(z, eps, check, compute_dtype)
    if compute_dtype is None:
        compute_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    b, d = z.shape[-2], z.shape[-1]
    c = d / (b * eps) / eps  # not d / (b * eps * eps): eps * eps underflows to 0 first
    if not c <= torch.finfo(compute_dtype).max:  # inf, or past the compute dtype (NaN fails too)
        raise ValueError(f"tcr_loss: eps = {eps:g} makes the scale d / (b eps^2) = {c:g} overflow "
                         f"{compute_dtype}; use a larger eps (or compute_dtype=torch.float64)")
    z3 = z if z.dim() == 3 else z.unsqueeze(0)
    r = _TotalCodingRate.apply(z3.to(compute_dtype), c, b <= d)
    if check:
        _raise_if_failed(r, z, compute_dtype)
    return r if z.dim() == 3 else r[0]
