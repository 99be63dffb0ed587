"""gather_tokens on the Triton path (EFFSSL_BACKEND=triton) against the reference.

On a GPU machine the kernels run on CUDA tensors; elsewhere on CPU tensors under
TRITON_INTERPRET=1 (conftest.py), so shapes stay tiny. On the GPU outputs are exact (one float32
add, one round-to-nearest); the interpreter truncates float32 -> bfloat16 on stores, so bfloat16
results there may differ by one bfloat16 step (BF16_INTERP_TOL).
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from effssl_kernels.ops.gather_tokens import gather_tokens  # noqa: E402
from effssl_kernels.reference.gather_tokens import gather_tokens_reference  # noqa: E402
from utils import DTYPES, HAS_GPU, INTERPRET  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (HAS_GPU or INTERPRET), reason="needs a CUDA device or TRITON_INTERPRET=1"),
]

DEVICE = "cuda" if HAS_GPU else "cpu"
BF16_INTERP_TOL = 2**-7  # one bfloat16 step, relative
# (rtol, atol) of gradients against float64: one rounding to the dtype (truncation when
# interpreting bfloat16) after a float32 sum
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2),
            torch.float64: (1e-12, 1e-12)}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("EFFSSL_BACKEND", "triton")


def _out_tol(dtype):
    return (BF16_INTERP_TOL, 0.0) if (dtype == torch.bfloat16 and INTERPRET) else (0.0, 0.0)


def _run(x, keep, pos, grad=None):
    """Forward (and gradients for `grad`) on DEVICE; results back on the CPU."""
    xd = x.detach().to(DEVICE).requires_grad_(x.requires_grad)
    pd = None if pos is None else pos.detach().to(DEVICE).requires_grad_(pos.requires_grad)
    out = gather_tokens(xd, keep.to(DEVICE), pd)
    assert out.device.type == DEVICE
    leaves = [t for t in (xd, pd) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad.to(DEVICE)) if grad is not None and leaves else ()
    return out.detach().cpu(), [g.cpu() for g in grads]


def _check(x, keep, pos):
    grad = torch.randn(keep.shape[0], keep.shape[1], x.shape[2])
    ref = gather_tokens_reference(x, keep, pos)
    grad = grad.to(ref.dtype)
    out, grads = _run(x, keep, pos, grad)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    rtol, atol = _out_tol(ref.dtype)
    torch.testing.assert_close(out, ref.detach(), rtol=rtol, atol=atol)
    leaves = [t for t in (x, pos) if t is not None and t.requires_grad]
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    p64 = None if pos is None else pos.detach().double().requires_grad_(pos.requires_grad)
    leaves64 = [t for t in (x64, p64) if t is not None and t.requires_grad]
    want = torch.autograd.grad(gather_tokens_reference(x64, keep, p64), leaves64, grad.double())
    for g, w, leaf in zip(grads, want, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        rtol, atol = GRAD_TOL[leaf.dtype]
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- plumbing
def test_runs_the_triton_kernels(monkeypatch):
    # Guards every test below against a silent fall-back to another backend.
    import effssl_kernels.triton.gather_tokens as tgt

    calls = []
    for name in ("gather_tokens_fwd", "gather_tokens_bwd"):
        real = getattr(tgt, name)
        monkeypatch.setattr(tgt, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    x = torch.randn(2, 5, 3, requires_grad=True)
    _check(x, torch.tensor([[0, 4], [2, 2]]), None)
    assert calls == ["gather_tokens_fwd", "gather_tokens_bwd"]


# ----------------------------------------------------------------------------- against the reference
SHAPES = [  # N, L, D, K, unique
    (2, 7, 5, 3, True),
    (2, 9, 33, 9, True),  # K = L, odd D
    (1, 4, 1, 1, True),  # K = 1, D = 1
    (3, 6, 20, 10, False),  # duplicates, K > L
    (2, 40, 130, 20, True),  # D over one 128-column tile
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pos_kind", ["none", "same", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(dtype, pos_kind, shape):
    N, L, D, K, unique = shape
    x = torch.randn(N, L, D).to(dtype).requires_grad_()
    pos = None
    if pos_kind != "none":
        pos = torch.randn(1, L, D).to(torch.float32 if pos_kind == "float32" else dtype).requires_grad_()
    if unique:
        keep = torch.rand(N, L).argsort(1)[:, :K].sort(1).values
    else:
        keep = torch.randint(0, L, (N, K))
    _check(x, keep, pos)


@pytest.mark.parametrize("xd,pd", [(torch.float64, None), (torch.float64, torch.float64),
                                    (torch.float32, torch.float64), (torch.float64, torch.bfloat16),
                                    (torch.bfloat16, torch.float64), (torch.float16, torch.float64)], ids=str)
def test_float64(xd, pd):
    # float64 adds and accumulates in float64 (a float32 accumulator would miss GRAD_TOL by far)
    x = torch.randn(3, 6, 20).to(xd).requires_grad_()
    pos = None if pd is None else torch.randn(1, 6, 20).to(pd).requires_grad_()
    _check(x, torch.randint(0, 6, (3, 10)), pos)


def test_double_backward():
    # the backward kernel's own backward is the forward kernel (gradient penalties)
    x = torch.randn(2, 5, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    pos = torch.randn(5, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    keep = torch.tensor([[4, 0, 4], [1, 2, 3]], device=DEVICE)
    assert torch.autograd.gradgradcheck(lambda a, b: gather_tokens(a, keep, b), (x, pos))


def test_mixed_dtypes_and_int32():
    x = torch.randn(2, 8, 6).half().requires_grad_()
    pos = torch.randn(8, 6).bfloat16().requires_grad_()
    keep = torch.randint(0, 8, (2, 5), dtype=torch.int32)
    _check(x, keep, pos)


@pytest.mark.parametrize("need", ["x", "pos", "both"])
def test_which_grads(need):
    x = torch.randn(3, 7, 4, requires_grad=need in ("x", "both"))
    pos = torch.randn(1, 7, 4, requires_grad=need in ("pos", "both"))
    keep = torch.randint(0, 7, (3, 5))
    _check(x, keep, pos)


def test_layouts():
    N, L, D, K = 2, 9, 12, 5
    x = torch.randn(N, L, D)
    pos = torch.randn(L, D)
    keep = torch.randint(0, L, (N, K))
    big = torch.zeros(N, 2 * L, 2 * D + 1)
    big[:, ::2, 1::2] = x
    xs = big[:, ::2, 1::2]
    ps = pos.t().contiguous().t()
    ks = keep.t().contiguous().t()
    want, _ = _run(x, keep, pos)
    got, _ = _run(xs, ks, ps)
    assert torch.equal(got, want)
    # a stride-0 gradient (from .sum()) gives the same grads as the materialised ones
    x1 = x.clone().to(DEVICE).requires_grad_()
    x2 = x.clone().to(DEVICE).requires_grad_()
    gather_tokens(x1, keep.to(DEVICE), pos.to(DEVICE)).sum().backward()
    gather_tokens(x2, keep.to(DEVICE), pos.to(DEVICE)).backward(torch.ones(N, K, D, device=DEVICE))
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("chunks", [1, 2, 16])
def test_pos_grad_chunks_deterministic(chunks, monkeypatch):
    # N = 5 over 2 chunks leaves the last chunk short (the n < N mask); runs are bitwise equal
    import effssl_kernels.triton.gather_tokens as tgt

    monkeypatch.setattr(tgt, "POS_CHUNKS", chunks)
    x = torch.randn(5, 6, 10, requires_grad=True)
    pos = torch.randn(1, 6, 10, requires_grad=True)
    keep = torch.randint(0, 6, (5, 8))
    _check(x, keep, pos)
    grad = torch.randn(5, 8, 10)
    _, g1 = _run(x, keep, pos, grad)
    _, g2 = _run(x, keep, pos, grad)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_out_of_range_never_read():
    # The launcher itself (no host check): bad indices give NaN rows and no gradient.
    from effssl_kernels.triton.gather_tokens import gather_tokens_bwd, gather_tokens_fwd

    x = torch.randn(2, 5, 4, device=DEVICE)
    pos = torch.randn(5, 4, device=DEVICE)
    keep = torch.tensor([[0, -1, 4], [5, 2, 2**40]], device=DEVICE)
    out = gather_tokens_fwd(x, keep, pos).cpu()
    bad = torch.tensor([[False, True, False], [True, False, True]])
    assert torch.isnan(out[bad]).all() and not torch.isnan(out[~bad]).any()
    torch.testing.assert_close(out[0, 2], (x[0, 4] + pos[4]).cpu(), rtol=0, atol=0)
    gx, gpos = gather_tokens_bwd(torch.ones(2, 3, 4, device=DEVICE), keep, 5, torch.float32, torch.float32, True, True)
    counts = torch.tensor([[1.0, 0, 0, 0, 1], [0, 0, 1, 0, 0]])
    assert torch.equal(gx.cpu(), counts[..., None].expand(2, 5, 4))
    assert torch.equal(gpos.cpu(), counts.sum(0)[:, None].expand(5, 4))


def test_cpu_tensors_are_checked_on_host():
    if DEVICE != "cpu":
        pytest.skip("CPU tensors reach Triton only when interpreting")
    with pytest.raises(ValueError, match="outside"):
        gather_tokens(torch.randn(2, 5, 4), torch.tensor([[0, 5], [1, 1]]))


@pytest.mark.skipif(not HAS_GPU, reason="the CUDA index policy")
def test_cuda_index_checks(monkeypatch):
    # Host check with EFFSSL_CHECK_INDICES=1 (a ValueError); without it a device-side assert,
    # which poisons the CUDA context, so that case runs in a child process.
    x = torch.randn(2, 5, 4, device="cuda")
    keep = torch.tensor([[0, 5], [1, 1]], device="cuda")
    monkeypatch.setenv("EFFSSL_CHECK_INDICES", "1")
    with pytest.raises(ValueError, match="outside"):
        gather_tokens(x, keep)
    code = (
        "import torch, effssl_kernels as ek\n"
        "x = torch.randn(2, 5, 4, device='cuda'); keep = torch.tensor([[0, 5], [1, 1]], device='cuda')\n"
        "ek.gather_tokens(x, keep); torch.cuda.synchronize()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "EFFSSL_CHECK_INDICES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "gather_tokens: keep values must be in [0, 5)" in out.stderr, out.stderr[-800:]


def test_empty_batch():
    x = torch.randn(0, 5, 4, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, 5, 4, device=DEVICE, requires_grad=True)
    out = gather_tokens(x, torch.zeros(0, 2, dtype=torch.long, device=DEVICE), pos)
    assert out.shape == (0, 2, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 5, 4) and torch.equal(pos.grad.cpu(), torch.zeros(1, 5, 4))


# ----------------------------------------------------------------------------- torch.library, compile
@pytest.mark.parametrize("with_pos", [False, True])
def test_opcheck(with_pos):
    x = torch.randn(2, 6, 5, device=DEVICE, requires_grad=True)
    pos = torch.randn(6, 5, device=DEVICE, requires_grad=True) if with_pos else None
    keep = torch.tensor([[5, 0, 0], [1, 2, 3]], device=DEVICE)
    torch.library.opcheck(torch.ops.effssl_kernels._gather_tokens_triton.default, (x, keep, pos))
    torch.library.opcheck(
        torch.ops.effssl_kernels._gather_tokens_backward_triton.default,
        (torch.randn(2, 3, 5, device=DEVICE), keep, 6, torch.bfloat16, torch.float32, True, with_pos),
    )


def test_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(3, 8, 6, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, 8, 6, device=DEVICE, requires_grad=True)
    keep = torch.randint(0, 8, (3, 5), device=DEVICE)

    def f(x, keep, pos):
        return (gather_tokens(x, keep, pos) * 2).sin().sum()

    backend = "aot_eager" if INTERPRET else "inductor"
    loss = torch.compile(f, fullgraph=True, backend=backend)(x, keep, pos)
    got = torch.autograd.grad(loss, (x, pos))
    loss_ref = f(x, keep, pos)
    want = torch.autograd.grad(loss_ref, (x, pos))
    torch.testing.assert_close(loss, loss_ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
