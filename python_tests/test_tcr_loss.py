"""tcr_loss (EMP-SSL's total coding rate) against its plain reference, closed forms and EMP-SSL's
own code: both Gram sides, batches, layouts, dtypes, gradients, compile, AMP and bad input.

The reference factors the ``d x d`` matrix with ``torch.logdet`` (LU), ours the smaller Gram
matrix with a Cholesky, so results agree to rounding, not bit for bit. float64 runs match the
float64 reference to 1e-10 relative. float32 runs are compared with the float64 reference of the
same input values: values within VAL_RTOL (measured <= 1.5e-7 over b, d in 1..1024, eps 0.05..0.5),
gradients within GRAD_RTOL of the largest gradient entry (measured <= 3e-5, at b = d = 512 and
eps = 0.05: the backward solves
with G, whose condition number reaches ~1 + d / eps^2), plus one rounding for half-precision z.
"""
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effssl_kernels import tcr_loss
from effssl_kernels.losses import _TotalCodingRate
from effssl_kernels.reference import tcr_loss_reference

VAL_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
# the gradient comes back in z's dtype: one rounding to half precision on top
GRAD_ROUNDING = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-6}


def _unit(*shape, dtype=torch.float64):
    """Random rows of unit L2 norm, as EMP-SSL feeds the loss."""
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1).to(dtype)


def _value_and_grad(fn, z, w=None, **kw):
    """``fn(z)`` and the gradient of ``sum(w * fn(z))``, ``w`` random (one weight per group) if None."""
    z = z.detach().requires_grad_()
    r = fn(z, **kw)
    w = torch.randn(r.shape, dtype=r.dtype) if w is None else w
    return r.detach(), torch.autograd.grad((r * w).sum(), z)[0], w


def _check_against_reference(z, eps=0.2, **kw):
    """Value and gradient of tcr_loss(z) against the float64 reference of the same values."""
    r, g, w = _value_and_grad(tcr_loss, z, eps=eps, **kw)
    z64 = z.detach().double().requires_grad_()
    want = tcr_loss_reference(z64, eps)
    gwant = torch.autograd.grad((want * w.double()).sum(), z64)[0]
    assert r.shape == z.shape[:-2] and g.shape == z.shape and g.dtype == z.dtype
    torch.testing.assert_close(r.double(), want.detach(), rtol=VAL_RTOL[r.dtype], atol=0)
    tol = max(GRAD_RTOL[r.dtype], GRAD_ROUNDING.get(z.dtype, 0.0))
    torch.testing.assert_close(g.double(), gwant, rtol=tol, atol=tol * gwant.abs().max().item())
    return r, g


# ----------------------------------------------------------------------------- the oracle itself
def _emp_ssl_total_coding_rate(X, eps):
    """EMP-SSL's TotalCodingRate.compute_discrimn_loss(X.T), transcribed: scalar = d / (b * eps)."""
    W = X.T
    p, m = W.shape  # [d, b]
    eye = torch.eye(p, dtype=W.dtype)
    scalar = p / (m * eps)
    return torch.logdet(eye + scalar * W.matmul(W.T)) / 2.0


def test_matches_emp_ssl_code_with_eps_squared():
    P, b, d = 4, 10, 24
    z_proj = _unit(P * b, d)  # EMP-SSL's projections, patch-major
    chunks = z_proj.chunk(P)
    emp = torch.stack([_emp_ssl_total_coding_rate(c, 0.2) for c in chunks])
    torch.testing.assert_close(tcr_loss(z_proj.view(P, b, d), eps=math.sqrt(0.2)), emp, rtol=1e-12, atol=0)
    torch.testing.assert_close(tcr_loss_reference(z_proj.view(P, b, d), eps=math.sqrt(0.2)), emp, rtol=1e-12, atol=0)
    # the default eps=0.2 here is EMP-SSL's eps=0.04
    torch.testing.assert_close(tcr_loss(chunks[0]), _emp_ssl_total_coding_rate(chunks[0], 0.04), rtol=1e-12, atol=0)
    # EMP-SSL's TCR loss term: the mean over patches of -R
    torch.testing.assert_close(-tcr_loss(z_proj.view(P, b, d), eps=math.sqrt(0.2)).mean(), -emp.mean())


@pytest.mark.parametrize("fn", [tcr_loss, tcr_loss_reference], ids=["tcr_loss", "reference"])
def test_closed_forms(fn):
    eps = 0.3
    # orthonormal rows (b <= d): every nonzero eigenvalue of c Z Z^T is c
    b, d = 6, 10
    q = torch.linalg.qr(torch.randn(d, b, dtype=torch.float64)).Q.T  # [b, d], orthonormal rows
    torch.testing.assert_close(fn(q, eps), torch.tensor(0.5 * b * math.log1p(d / (b * eps**2)), dtype=torch.float64))
    # b identical unit rows: rank one, eigenvalue c * b = d / eps^2
    row = _unit(1, d)
    want = torch.tensor(0.5 * math.log1p(d / eps**2), dtype=torch.float64)
    torch.testing.assert_close(fn(row.expand(8, d), eps), want)
    # any z: 0.5 * sum(log(1 + c s_i^2)) over its singular values, either side
    for shape in [(5, 9), (9, 5), (7, 7)]:
        z = torch.randn(*shape, dtype=torch.float64)
        c = shape[1] / (shape[0] * eps**2)
        s = torch.linalg.svdvals(z)
        torch.testing.assert_close(fn(z, eps), 0.5 * torch.log1p(c * s**2).sum(), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- against the reference
SHAPES = [  # b < d, b > d, b == d, 1s, odd sizes, batched
    (5, 9), (9, 5), (7, 7), (1, 1), (1, 33), (33, 1), (12, 129),
    (3, 8, 20), (3, 20, 8), (2, 16, 16), (1, 33, 7), (2, 48, 96),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("eps", [0.2, 0.05])  # EMP-SSL's value and a badly conditioned one
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(dtype, eps, shape):
    r, _ = _check_against_reference(_unit(*shape, dtype=dtype), eps)
    assert r.dtype == dtype


def test_unnormalised_rows():
    # rows are used as given (no normalisation inside): a scaled z is a different matrix
    z = _unit(3, 6, 10) * torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)[:, None, None]
    r, _ = _check_against_reference(z)
    assert r[0] < tcr_loss(z[1]) < r[2]


def test_batched_under_several_threads():
    # After torch.set_num_threads(n > 1), torch's batched CPU LU runs MKL's getrf on several
    # threads at once and returns corrupt pivots for matrices above 14 x 14 (pytorch#142815): a
    # batched torch.logdet gives wrong values. The reference loops over groups, as EMP-SSL does;
    # ours factors with a Cholesky. Both must stay right here.
    z = _unit(3, 40, 256, dtype=torch.float32)  # 256 x 256 LUs in the reference: corrupt in a batch
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _check_against_reference(z)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(5, 11), (11, 5), (6, 6), (3, 4, 9), (3, 9, 4)], ids=str)
def test_gram_sides_agree(shape):
    # logdet(I_d + c Z^T Z) = logdet(I_b + c Z Z^T): run the autograd.Function on each side
    z = _unit(*shape)
    z3 = z if z.dim() == 3 else z[None]
    c = shape[-1] / (shape[-2] * 0.2**2)
    rb, gb, w = _value_and_grad(lambda t: _TotalCodingRate.apply(t, c, True), z3)
    rd, gd, _ = _value_and_grad(lambda t: _TotalCodingRate.apply(t, c, False), z3, w)
    torch.testing.assert_close(rb, rd, rtol=1e-12, atol=0)
    torch.testing.assert_close(gb, gd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rb, tcr_loss_reference(z3), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(5, 11), (11, 5), (6, 6), (2, 3, 9), (2, 9, 3)], ids=str)
def test_factors_the_smaller_gram(shape):
    n = min(shape[-2:])
    with mock.patch.object(torch.linalg, "cholesky_ex", wraps=torch.linalg.cholesky_ex) as spy:
        tcr_loss(_unit(*shape))
    (G,), _ = spy.call_args
    assert G.shape[-2:] == (n, n)


def test_layouts():
    # transposed and strided views, a permuted batch and a stride-0 batch give the contiguous result
    P, b, d = 3, 6, 10
    z = _unit(P, b, d)
    want, gwant, w = _value_and_grad(tcr_loss, z)
    big = torch.zeros(P, 2 * b, 3 * d + 1, dtype=z.dtype)
    big[:, ::2, 1::3] = z
    views = [
        z.transpose(1, 2).contiguous().transpose(1, 2),  # column-major rows
        big[:, ::2, 1::3],
        z.permute(1, 0, 2).contiguous().permute(1, 0, 2),  # patch dimension inside
    ]
    for v in views:
        assert not v.is_contiguous()
        r, g, _ = _value_and_grad(tcr_loss, v, w)
        torch.testing.assert_close(r, want, rtol=1e-12, atol=0)
        torch.testing.assert_close(g, gwant, rtol=1e-10, atol=1e-12)
    # 2-D transposed view and a stride-0 batch of one group
    zt = _unit(d, b).T
    torch.testing.assert_close(tcr_loss(zt), tcr_loss(zt.contiguous()), rtol=1e-12, atol=0)
    e = z[0].expand(4, b, d)
    torch.testing.assert_close(tcr_loss(e), tcr_loss(z[0]).expand(4), rtol=1e-12, atol=0)
    _check_against_reference(e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (2, 24, 40)], ids=str)
def test_half_input_is_upcast_before_the_gram(dtype, shape):
    z = _unit(*shape, dtype=dtype)
    r, g = _check_against_reference(z)  # float32 tolerances against the float64 run of these values
    assert r.dtype == torch.float32 and g.dtype == dtype
    # a Gram matmul in the input's precision (what AMP would do) is far off: the upcast matters
    b, d = shape[-2:]
    n = min(b, d)
    gram = (z @ z.mT) if b <= d else (z.mT @ z)
    half_gram = 0.5 * torch.logdet(torch.eye(n) + d / (b * 0.2**2) * gram.float())
    want = tcr_loss_reference(z.double())
    err_ours = (r.double() - want).abs().max()
    err_half = (half_gram.double() - want).abs().max()
    assert err_ours * 10 < err_half


def test_compute_dtype():
    z32 = _unit(2, 5, 9, dtype=torch.float32)
    # float32 input computed in float64: the float64 answer for those float32 values
    r, g = _check_against_reference(z32, compute_dtype=torch.float64)
    assert r.dtype == torch.float64 and g.dtype == torch.float32
    torch.testing.assert_close(r, tcr_loss_reference(z32.double()), rtol=1e-12, atol=0)
    # float64 input computed in float32
    z64 = _unit(2, 5, 9)
    r, g = _check_against_reference(z64, compute_dtype=torch.float32)
    assert r.dtype == torch.float32 and g.dtype == torch.float64
    assert tcr_loss(z64).dtype == torch.float64 and tcr_loss(z64.float()).dtype == torch.float32


def test_empty_batch_of_groups():
    z = torch.zeros(0, 4, 6, requires_grad=True)
    r = tcr_loss(z)
    assert r.shape == (0,) and r.dtype == torch.float32
    r.sum().backward()
    assert torch.equal(z.grad, torch.zeros(0, 4, 6))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    P=st.sampled_from([None, 1, 2, 3]),
    b=st.integers(1, 9),
    d=st.integers(1, 9),
    eps=st.floats(0.05, 3.0),
    normalise=st.booleans(),
)
def test_fuzz(P, b, d, eps, normalise):
    torch.manual_seed(b * 100 + d * 10 + (P or 0))
    shape = (b, d) if P is None else (P, b, d)
    z = _unit(*shape) if normalise else torch.randn(*shape, dtype=torch.float64)
    _check_against_reference(z, eps)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4), (1, 3), (2, 3, 5), (2, 5, 3)], ids=str)
def test_gradcheck(shape):
    z = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tcr_loss(t, 0.7), (z,))


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 2)], ids=str)
def test_gradgradcheck(shape):
    # create_graph=True refactors G from z with differentiable ops (the saved factor is a constant)
    z = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: tcr_loss(t, 0.7), (z,))


def test_gradient_closed_form():
    # dR/dZ = c (I_b + c Z Z^T)^{-1} Z, by a dense solve
    b, d, eps = 6, 9, 0.4
    z = _unit(b, d).requires_grad_()
    (g,) = torch.autograd.grad(tcr_loss(z, eps), z)
    c = d / (b * eps**2)
    zd = z.detach()
    want = c * torch.linalg.solve(torch.eye(b, dtype=z.dtype) + c * zd @ zd.T, zd)
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- compile, AMP
def test_compile_fullgraph():
    torch._dynamo.reset()

    def f(z):
        return -tcr_loss(F.normalize(z, dim=-1), 0.3, check=False).mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    for shape in [(2, 4, 6), (3, 7, 5)]:  # b < d, then b > d (a recompile under the b <= d guard)
        z = torch.randn(*shape, requires_grad=True)
        loss = compiled(z)
        (g,) = torch.autograd.grad(loss, z)
        want = f(z)
        (gwant,) = torch.autograd.grad(want, z)
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(g, gwant)


def test_autocast_does_not_lower_the_gram():
    z = _unit(3, 12, 40, dtype=torch.float32)
    want, gwant, w = _value_and_grad(tcr_loss, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, g, _ = _value_and_grad(tcr_loss, z, w)
        zb = torch.nn.functional.linear(z, torch.eye(40))  # bfloat16 under AMP, as a projector's output
        rb = tcr_loss(zb)
    assert r.dtype == torch.float32 and torch.equal(r, want) and torch.equal(g, gwant)
    assert zb.dtype == torch.bfloat16 and rb.dtype == torch.float32
    torch.testing.assert_close(rb, tcr_loss(zb), rtol=0, atol=0)


def test_autocast_is_off_on_every_device_type_that_has_one():
    # xpu and mps have autocast too (cannot run here): the Gram must not drop to half there either
    from effssl_kernels.losses import _no_autocast

    for device_type in ("cpu", "cuda", "xpu", "mps"):
        ctx = _no_autocast(device_type)
        assert isinstance(ctx, torch.autocast) and ctx.device == device_type and not ctx._enabled
    assert not isinstance(_no_autocast("meta"), torch.autocast)  # none to switch off


def test_reference_upcasts_half_to_float32():
    # the paper's formula with slogdet, in float32 (torch.logdet has no half kernels)
    for dtype in (torch.float16, torch.bfloat16):
        z = _unit(2, 6, 10, dtype=dtype)
        c = 10 / (6 * 0.2**2)
        want = torch.stack([0.5 * torch.linalg.slogdet(torch.eye(10) + c * zi.T @ zi).logabsdet for zi in z.float()])
        torch.testing.assert_close(tcr_loss_reference(z), want)  # float32, as documented
        torch.testing.assert_close(tcr_loss_reference(z[0]), want[0])


def test_reference_empty_batch_of_groups():
    # [0, b, d] gives [0], still attached to z's graph (a zero gradient), as tcr_loss does
    z = torch.zeros(0, 4, 6, requires_grad=True)
    r = tcr_loss_reference(z)
    assert r.shape == (0,) and r.dtype == torch.float32 and r.requires_grad
    r.sum().backward()
    assert torch.equal(z.grad, torch.zeros(0, 4, 6))


# ----------------------------------------------------------------------------- not positive definite
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(bad):
    z = _unit(3, 5, 8, dtype=torch.float32)
    z[1, 2, 3] = bad
    msg = r"not positive definite in torch.float32 for patch group\(s\) \[1\] of 3.*NaN or inf"
    with pytest.raises(ValueError, match=msg):
        tcr_loss(z)
    with pytest.raises(ValueError, match="not positive definite"):
        tcr_loss(z[1])
    # check=False: NaN for that group only (value and gradient), the others untouched, no error
    r, g, w = _value_and_grad(tcr_loss, z, check=False)
    assert torch.isnan(r[1]) and torch.equal(r[[0, 2]], tcr_loss(z[[0, 2]]))
    _, gwant, _ = _value_and_grad(tcr_loss, z[[0, 2]], w[[0, 2]])
    assert torch.isnan(g[1]).all() and torch.equal(g[[0, 2]], gwant)
    assert torch.isnan(tcr_loss(z[1], check=False))


def test_overflowing_input_raises():
    # finite entries whose Gram overflows float32: raises, and float64 computes it (the d x d
    # reference cannot: LU loses the identity next to 1e60, so the singular values are the oracle)
    z = (_unit(4, 6) * 1e30).float()
    with pytest.raises(ValueError, match="positive definite.*too large for torch.float32"):
        tcr_loss(z)
    assert torch.isnan(tcr_loss(z, check=False))
    want = 0.5 * torch.log1p(6 / (4 * 0.2**2) * torch.linalg.svdvals(z.double()) ** 2).sum()
    torch.testing.assert_close(tcr_loss(z, compute_dtype=torch.float64), want, rtol=1e-12, atol=0)


def test_indefinite_gram_gives_nan():
    # a Gram that rounding made indefinite (first group) fails in its group only
    z = _unit(2, 3, 5)
    G = torch.tensor([[[1.0, 2.0], [2.0, 1.0]], [[2.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    with mock.patch("effssl_kernels.losses._gram", return_value=G):
        r = tcr_loss(z, check=False)
        with pytest.raises(ValueError, match=r"patch group\(s\) \[0\] of 2"):
            tcr_loss(z)
    assert torch.isnan(r[0]) and r[1].item() == pytest.approx(math.log(2.0))


def test_a_non_finite_factor_gives_nan_even_with_info_0():
    # an overflowing Gram can factor "successfully" (info 0) into an inf pivot: NaN, never inf
    z = _unit(2, 3, 5)
    L = 2 * torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    L[0, 1, 1] = float("inf")
    with mock.patch.object(torch.linalg, "cholesky_ex", return_value=(L, torch.zeros(2, dtype=torch.int32))):
        r = tcr_loss(z, check=False)
    assert torch.isnan(r[0]) and r[1].item() == pytest.approx(3 * math.log(2.0))


def test_cholesky_info_is_checked():
    # LAPACK leaves the failing (non-positive) pivot on L's diagonal, so its log is NaN anyway;
    # other backends need not: a nonzero info alone must give NaN, not the partial factor's value
    z = _unit(2, 3, 5)
    L = 2 * torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    info = torch.tensor([0, 2], dtype=torch.int32)
    with mock.patch.object(torch.linalg, "cholesky_ex", return_value=(L, info)):
        r, g, w = _value_and_grad(tcr_loss, z, check=False)
        with pytest.raises(ValueError, match=r"patch group\(s\) \[1\] of 2"):
            tcr_loss(z)
    assert r[0].item() == pytest.approx(3 * math.log(2.0)) and torch.isnan(r[1])
    # G^{-1} = I / 4 from that factor: the gradient is c * w / 4 * z in the good group, NaN in the other
    c = 5 / (3 * 0.2**2)
    torch.testing.assert_close(g[0], c * w[0] / 4 * z[0], rtol=1e-12, atol=0)
    assert torch.isnan(g[1]).all()


# ----------------------------------------------------------------------------- bad input
BAD = [
    (lambda z: tcr_loss(z, 0.0), ValueError, "eps must be finite and > 0"),
    (lambda z: tcr_loss(z, -0.2), ValueError, "eps must be finite and > 0"),
    (lambda z: tcr_loss(z, float("nan")), ValueError, "eps must be finite and > 0"),
    (lambda z: tcr_loss(z, float("inf")), ValueError, "eps must be finite and > 0"),
    # tiny eps: the scale d / (b eps^2) overflows (eps * eps alone would underflow to 0 first)
    (lambda z: tcr_loss(z, 1e-170), ValueError, "overflow"),
    (lambda z: tcr_loss(z, 1e-25), ValueError, "overflow torch.float32"),
    (lambda z: tcr_loss(z, torch.tensor(0.2)), TypeError, "eps must be a Python float"),
    (lambda z: tcr_loss(z, True), TypeError, "eps must be a Python float"),
    (lambda z: tcr_loss(z, "0.2"), TypeError, "eps must be a Python float"),
    (lambda z: tcr_loss(z[0, 0]), ValueError, r"2-D \[b, d\] or 3-D \[P, b, d\]"),
    (lambda z: tcr_loss(z[None]), ValueError, r"2-D \[b, d\] or 3-D \[P, b, d\]"),
    (lambda z: tcr_loss(z[0, 0, 0]), ValueError, "2-D"),
    (lambda z: tcr_loss(z[:, :0]), ValueError, "b >= 1 rows and d >= 1 columns"),
    (lambda z: tcr_loss(z[:, :, :0]), ValueError, "b >= 1 rows and d >= 1 columns"),
    (lambda z: tcr_loss(z[0, :0]), ValueError, "b >= 1 rows"),
    (lambda z: tcr_loss(z.long()), TypeError, "float16, bfloat16, float32 or float64, got torch.int64"),
    (lambda z: tcr_loss(z.int()), TypeError, "float16, bfloat16, float32 or float64"),
    (lambda z: tcr_loss(z.bool()), TypeError, "float16, bfloat16, float32 or float64"),
    (lambda z: tcr_loss(z.to(torch.complex64)), TypeError, "float16, bfloat16, float32 or float64"),
    (lambda z: tcr_loss(z.numpy()), TypeError, "z must be a tensor"),
    (lambda z: tcr_loss(z.tolist()), TypeError, "z must be a tensor"),
    (lambda z: tcr_loss(z, check=1), TypeError, "check must be a bool"),
    (lambda z: tcr_loss(z, compute_dtype=torch.float16), TypeError, "compute_dtype must be"),
    (lambda z: tcr_loss(z, compute_dtype=torch.bfloat16), TypeError, "compute_dtype must be"),
]


@pytest.mark.parametrize("call,exc,msg", BAD)
def test_bad_input(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(_unit(2, 4, 6, dtype=torch.float32))
