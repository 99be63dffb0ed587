"""gather_tokens: the C++ CPU kernel (and, on a GPU machine, the public function on CUDA) against
the reference, with gradients, registration, compile, AMP and bad input.

Forward outputs are compared exactly: every backend does one float32 add and one rounding, as
torch's own ``x + pos`` does. Gradients are compared with a float64 run of the reference, within
the tolerance of one rounding to the gradient's dtype (GRAD_TOL), since ours sum in float32.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effssl_kernels import _backend
from effssl_kernels.ops.gather_tokens import gather_tokens
from effssl_kernels.reference.gather_tokens import gather_tokens_reference
from utils import DTYPES, HAS_GPU

pytestmark = pytest.mark.skipif(not _backend.HAS_EXT, reason="needs the compiled extension")

DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])
# (rtol, atol) of a gradient against the float64 reference: one rounding to the dtype, plus
# float32 summation of a few terms (loosest for bfloat16's 8-bit mantissa).
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3),
            torch.float64: (1e-12, 1e-12)}


def _keep(N, L, K, unique=True, dtype=torch.int64):
    """Sorted unique indices (as PatchDropout(ordered=True)) or random ones with duplicates."""
    if unique:
        return torch.rand(N, L).argsort(dim=1)[:, :K].sort(dim=1).values.to(dtype)
    return torch.randint(0, L, (N, K)).to(dtype)


def _grads(fn, x, keep, pos, grad):
    out = fn(x, keep, pos)
    leaves = [t for t in (x, pos) if t is not None and t.requires_grad]
    return out, torch.autograd.grad(out, leaves, grad)


def _check_against_reference(x, keep, pos, device="cpu"):
    """Forward exact vs the reference; gradients vs the float64 reference within GRAD_TOL."""
    xd = x.detach().to(device).requires_grad_(x.requires_grad)
    pd = None if pos is None else pos.detach().to(device).requires_grad_(pos.requires_grad)
    out = gather_tokens(xd, keep.to(device), pd)
    ref = gather_tokens_reference(x, keep, pos)
    assert out.device.type == device and out.dtype == ref.dtype and out.shape == ref.shape
    assert out.is_contiguous()
    torch.testing.assert_close(out.cpu(), ref.detach(), rtol=0, atol=0)
    if not out.requires_grad:
        return
    grad = torch.randn(out.shape).to(out.dtype)
    leaves = [t for t in (xd, pd) if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, leaves, grad.to(device))
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    p64 = None if pos is None else pos.detach().double().requires_grad_(pos.requires_grad)
    _, want = _grads(gather_tokens_reference, x64, keep, p64, grad.double())
    for g, w, leaf in zip(got, want, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        rtol, atol = GRAD_TOL[leaf.dtype]
        torch.testing.assert_close(g.cpu().double(), w, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- the oracle itself
def test_reference_matches_loop():
    x, pos = torch.randn(2, 6, 3), torch.randn(1, 6, 3)
    keep = torch.tensor([[5, 0, 0], [2, 3, 4]])
    ref = gather_tokens_reference(x, keep, pos)
    for n in range(2):
        for k in range(3):
            assert torch.equal(ref[n, k], x[n, keep[n, k]] + pos[0, keep[n, k]])


def test_matches_timm_patch_dropout():
    # timm's path: pos add over all tokens, then PatchDropout's gather with its own indices.
    from timm.layers.patch_dropout import PatchDropoutWithIndices

    x, pos = torch.randn(4, 196, 24), torch.randn(1, 196, 24)
    drop = PatchDropoutWithIndices(0.5, num_prefix_tokens=0, ordered=True).train()
    want, keep = drop(x + pos)
    assert keep.shape == (4, 98)
    torch.testing.assert_close(gather_tokens(x, keep, pos), want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- against the reference
SHAPES = [  # N, L, D, K, unique
    (2, 16, 8, 4, True),
    (3, 7, 33, 7, True),  # K = L, odd D
    (2, 5, 1, 1, True),  # K = 1, D = 1
    (4, 9, 129, 12, False),  # duplicates, K > L
    (2, 196, 65, 98, True),  # ViT token count, keep 0.5
    (1, 3, 16, 40, False),  # many duplicates per token
]
POS = ["none", "same", "float32", "2d"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pos_kind", POS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, dtype, pos_kind, shape):
    N, L, D, K, unique = shape
    x = torch.randn(N, L, D).to(dtype).requires_grad_()
    pos = None
    if pos_kind != "none":
        pdt = torch.float32 if pos_kind == "float32" else dtype
        pos = torch.randn(*((L, D) if pos_kind == "2d" else (1, L, D))).to(pdt).requires_grad_()
    _check_against_reference(x, _keep(N, L, K, unique), pos, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xd,pd", [(torch.float16, torch.bfloat16), (torch.float32, torch.float16),
                                    (torch.bfloat16, torch.float32)], ids=str)
def test_mixed_dtypes_promote(device, xd, pd):
    x = torch.randn(2, 10, 12).to(xd).requires_grad_()
    pos = torch.randn(1, 10, 12).to(pd).requires_grad_()
    keep = _keep(2, 10, 6, unique=False)
    out = gather_tokens(x.to(device), keep.to(device), pos.to(device))
    assert out.dtype == torch.promote_types(xd, pd) == torch.float32
    _check_against_reference(x, keep, pos, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts(device, dtype):
    # Strided x (token and feature strides), transposed keep, strided pos, int32 keep and an
    # expanded (stride-0) gradient all give the contiguous answer bit for bit.
    N, L, D, K = 3, 11, 20, 7
    x = torch.randn(N, L, D).to(device, dtype)
    pos = torch.randn(L, D).to(device, dtype)
    keep = _keep(N, L, K, unique=False).to(device)
    big = torch.zeros(N, 2 * L, 2 * D + 1, dtype=dtype, device=device)
    big[:, ::2, 1::2] = x
    xs = big[:, ::2, 1::2]
    ps = torch.zeros(D, 3 * L, dtype=dtype, device=device)
    ps[:, ::3] = pos.t()
    ps = ps[:, ::3].t()
    ks = keep.t().contiguous().t()
    assert not (xs.is_contiguous() or ps.is_contiguous() or ks.is_contiguous())
    want = gather_tokens(x, keep, pos)
    for args in [(xs, keep, pos), (x, ks, ps), (xs, ks.int(), ps), (x.transpose(0, 1).contiguous().transpose(0, 1), keep, pos)]:
        torch.testing.assert_close(gather_tokens(*args), want, rtol=0, atol=0)
    # an expanded gradient: out.sum() backward hands the op a stride-0 grad; strided leaves and
    # a strided keep give the same gradients
    x1 = x.clone().requires_grad_()
    p1 = pos.clone().requires_grad_()
    xs1, ps1 = xs.detach().requires_grad_(), ps.detach().requires_grad_()
    gather_tokens(xs1, ks, ps1).sum().backward()
    gather_tokens(x1, keep, p1).sum().backward()
    x2 = x.clone().requires_grad_()
    p2 = pos.clone().requires_grad_()
    gather_tokens(x2, keep, p2).backward(torch.ones(N, K, D, dtype=dtype, device=device))
    assert torch.equal(x1.grad, x2.grad) and torch.equal(p1.grad, p2.grad)
    assert torch.equal(xs1.grad, x1.grad) and torch.equal(ps1.grad, p1.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_index_dtypes_and_pos_shapes(device):
    x = torch.randn(2, 9, 6, device=device)
    pos = torch.randn(1, 9, 6, device=device)
    keep = _keep(2, 9, 4).to(device)
    want = gather_tokens(x, keep, pos)
    torch.testing.assert_close(gather_tokens(x, keep.int(), pos), want, rtol=0, atol=0)
    torch.testing.assert_close(gather_tokens(x, keep, pos[0]), want, rtol=0, atol=0)
    p3 = pos.clone().requires_grad_()
    p2 = pos[0].clone().requires_grad_()
    gather_tokens(x, keep, p3).sum().backward()
    gather_tokens(x, keep.int(), p2).sum().backward()
    assert p3.grad.shape == (1, 9, 6) and p2.grad.shape == (9, 6)
    assert torch.equal(p3.grad[0], p2.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need", ["x", "pos", "both", "none"])
def test_which_grads(device, need):
    x = torch.randn(2, 8, 5, device=device, requires_grad=need in ("x", "both"))
    pos = torch.randn(8, 5, device=device, requires_grad=need in ("pos", "both"))
    keep = _keep(2, 8, 3, unique=False).to(device)
    out = gather_tokens(x, keep, pos)
    if need == "none":
        assert not out.requires_grad
        return
    out.backward(torch.ones_like(out))
    counts = torch.zeros(2, 8, device=device).scatter_add_(1, keep, torch.ones(2, 3, device=device))
    if need in ("x", "both"):
        assert torch.equal(x.grad, counts[..., None].expand(2, 8, 5))
    if need in ("pos", "both"):
        assert torch.equal(pos.grad, counts.sum(0)[:, None].expand(8, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_dropped_tokens_get_zero_grad_and_no_pos(device):
    x = torch.full((2, 6, 4), 7.0, device=device, requires_grad=True)
    keep = torch.tensor([[1, 1, 4], [0, 5, 5]], device=device)
    gather_tokens(x, keep).backward(torch.ones(2, 3, 4, device=device))
    want = torch.tensor([[0, 2, 0, 0, 1, 0], [1, 0, 0, 0, 0, 2]], dtype=torch.float32, device=device)
    assert torch.equal(x.grad, want[..., None].expand(2, 6, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_duplicates_accumulate_in_float32(device):
    # Flash-attention rule: our bf16 gradient's error against float64 is at most that of torch's
    # own bf16 autograd (scatter_add and index_put in bf16, a rounding per add).
    N, L, D, K = 8, 4, 64, 64  # every token kept ~16 times per sample, ~128 times in the batch
    x = torch.randn(N, L, D).bfloat16().requires_grad_()
    pos = torch.randn(L, D).bfloat16().requires_grad_()
    keep = torch.randint(0, L, (N, K))
    grad = torch.randn(N, K, D).bfloat16()
    xd, pd = x.detach().to(device).requires_grad_(), pos.detach().to(device).requires_grad_()
    ours = torch.autograd.grad(gather_tokens(xd, keep.to(device), pd), (xd, pd), grad.to(device))
    torch_bf16 = torch.autograd.grad(gather_tokens_reference(x, keep, pos), (x, pos), grad)
    x64, p64 = x.detach().double().requires_grad_(), pos.detach().double().requires_grad_()
    exact = torch.autograd.grad(gather_tokens_reference(x64, keep, p64), (x64, p64), grad.double())
    for o, t, e in zip(ours, torch_bf16, exact):
        err_ours = (o.cpu().double() - e).abs().max()
        err_torch = (t.double() - e).abs().max()
        assert err_ours <= err_torch
        assert err_ours <= 2**-8 * e.abs().max()  # one bf16 rounding of the float32 sum


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    # sizes past the C++ kernels' at::parallel_for grains, so 2 threads really split the work:
    # forward N*K = 3200 rows (grain 32768/D = 682), grad_x N = 16 (grain 65536/(L*D) = 5),
    # grad_pos L = 256 (grain 65536/((N*K/L)*D) = 113)
    N, L, K, D = 16, 256, 200, 48
    x = torch.randn(N, L, D, device=device, requires_grad=True)
    pos = torch.randn(1, L, D, device=device, requires_grad=True)
    keep = torch.randint(0, L, (N, K), device=device)
    # magnitudes spread over 1e-4..1e4, so another summation order changes the last bits
    grad = torch.randn(N, K, D, device=device) * torch.logspace(-4, 4, K, device=device)[None, :, None]
    runs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            runs.append(torch.autograd.grad(gather_tokens(x, keep, pos), (x, pos), grad))
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        assert torch.equal(r[0], runs[0][0]) and torch.equal(r[1], runs[0][1])
    if device == "cpu":  # the C++ kernel's documented order: duplicates added in ascending k
        gx, gp = torch.zeros(N, L, D), torch.zeros(L, D)
        rows = torch.arange(N)
        for k in range(K):  # distinct rows per k: one vector add each
            gx[rows, keep[:, k]] += grad[:, k]
        for n in range(N):
            for k in range(K):
                gp[keep[n, k]] += grad[n, k]
        assert torch.equal(runs[0][0], gx) and torch.equal(runs[0][1], gp[None])


def test_empty_batch_and_zero_width():
    x = torch.randn(0, 5, 4, requires_grad=True)
    pos = torch.randn(1, 5, 4, requires_grad=True)
    out = gather_tokens(x, torch.zeros(0, 3, dtype=torch.long), pos)
    assert out.shape == (0, 3, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 5, 4) and torch.equal(pos.grad, torch.zeros(1, 5, 4))
    assert gather_tokens(torch.randn(2, 5, 0), torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 0)


@pytest.mark.parametrize("bad", [[[7], [0]], [[0], [-3]]])
def test_zero_width_still_checks_indices(bad):
    # D == 0 leaves the kernels no row to read, so no index would be checked there
    x = torch.randn(2, 5, 0, requires_grad=True)
    keep = torch.tensor(bad)
    with pytest.raises(ValueError, match="outside"):
        gather_tokens(x, keep)
    with pytest.raises(ValueError, match="outside"):
        torch.ops.effssl_kernels.gather_tokens(x.detach(), keep, None)
    with pytest.raises(ValueError, match="outside"):
        torch.ops.effssl_kernels.gather_tokens_backward(
            torch.randn(2, 1, 0), keep, 5, torch.float32, torch.float32, True, True)


@pytest.mark.parametrize("xd,pd", [(torch.float64, None), (torch.float64, torch.float64),
                                    (torch.float32, torch.float64), (torch.float64, torch.bfloat16),
                                    (torch.float16, torch.float64)], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_float64(xd, pd, shape):
    # float64 (e.g. a float64 ViT's unfused embedding path) promotes as torch does, adds and
    # accumulates in float64
    N, L, D, K, unique = shape
    x = torch.randn(N, L, D).to(xd).requires_grad_()
    pos = None if pd is None else torch.randn(1, L, D).to(pd).requires_grad_()
    keep = _keep(N, L, K, unique)
    out = gather_tokens(x, keep, pos)
    assert out.dtype == (xd if pd is None else torch.promote_types(xd, pd))
    _check_against_reference(x, keep, pos)

def test_gradcheck():
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, 5, 3, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([[4, 0, 4], [1, 2, 3]])
    assert torch.autograd.gradcheck(lambda a, b: gather_tokens(a, keep, b), (x, pos))
    # float32 too: the op is linear, so central differences with eps = 0.5 are exact up to
    # float32 rounding
    x32, p32 = x.detach().float().requires_grad_(), pos.detach().float().requires_grad_()
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(lambda a, b: gather_tokens(a, keep, b), (x32, p32), eps=0.5,
                                        atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("need", ["x", "pos", "both"])
def test_double_backward(need):
    # The backward is linear in the incoming gradient, and differentiable again (gradient
    # penalties): gradgradcheck, and a penalty through a non-linear layer against the reference.
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=need != "pos")
    pos = torch.randn(1, 5, 3, dtype=torch.float64, requires_grad=need != "x")
    keep = torch.tensor([[4, 0, 4], [1, 2, 3]])
    assert torch.autograd.gradgradcheck(lambda a, b: gather_tokens(a, keep, b), (x, pos))
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def penalty(fn):
        leaves = [t for t in (x, pos) if t.requires_grad]
        gs = torch.autograd.grad(fn(x @ w, keep, pos).tanh().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in gs), [w] + leaves)

    for got, want in zip(penalty(gather_tokens), penalty(gather_tokens_reference)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_backend(monkeypatch):
    monkeypatch.setenv("EFFSSL_BACKEND", "reference")
    x, pos = torch.randn(2, 6, 4), torch.randn(1, 6, 4)
    keep = torch.tensor([[0, 5], [3, 3]])
    assert torch.equal(gather_tokens(x, keep, pos), gather_tokens_reference(x, keep, pos))
    with pytest.raises(ValueError, match="outside"):
        gather_tokens(x, torch.tensor([[0, -1], [3, 3]]), pos)  # host check: no silent wrap-around


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    N=st.integers(0, 3),
    L=st.integers(1, 20),
    D=st.integers(1, 40),
    K=st.integers(1, 25),
    dtype=st.sampled_from(DTYPES),
    pos_kind=st.sampled_from(POS),
    int32=st.booleans(),
)
def test_fuzz_shapes(N, L, D, K, dtype, pos_kind, int32):
    torch.manual_seed(N * 1000 + L * 50 + D + K)
    x = torch.randn(N, L, D).to(dtype).requires_grad_()
    pos = None
    if pos_kind != "none":
        pdt = torch.float32 if pos_kind == "float32" else dtype
        pos = torch.randn(*((L, D) if pos_kind == "2d" else (1, L, D))).to(pdt).requires_grad_()
    keep = torch.randint(0, L, (N, K), dtype=torch.int32 if int32 else torch.int64)
    _check_against_reference(x, keep, pos)


# ----------------------------------------------------------------------------- torch.library, compile, AMP
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("with_pos", [False, True])
def test_opcheck(requires_grad, with_pos):
    x = torch.randn(2, 7, 5, requires_grad=requires_grad)
    pos = torch.randn(7, 5, requires_grad=requires_grad) if with_pos else None
    keep = torch.tensor([[6, 0, 0], [1, 2, 3]])
    torch.library.opcheck(torch.ops.effssl_kernels.gather_tokens.default, (x, keep, pos))
    torch.library.opcheck(torch.ops.effssl_kernels.gather_tokens.default, (x.bfloat16().detach(), keep.int(), pos))
    grad = torch.randn(2, 3, 5)
    torch.library.opcheck(
        torch.ops.effssl_kernels.gather_tokens_backward.default,
        (grad, keep, 7, torch.bfloat16, torch.float32, True, with_pos),
    )


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    torch._dynamo.reset()
    x = torch.randn(3, 10, 8, requires_grad=True)
    pos = torch.randn(1, 10, 8, requires_grad=True)
    keep = torch.randint(0, 10, (3, 4))

    def f(x, keep, pos):
        return (gather_tokens(x, keep, pos) * 2).sin().sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)(x, keep, pos)
    gx, gp = torch.autograd.grad(loss, (x, pos))
    loss_ref = f(x, keep, pos)
    want = torch.autograd.grad(loss_ref, (x, pos))
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(gx, want[0])
    torch.testing.assert_close(gp, want[1])


def test_autocast_follows_input_dtypes():
    # The op casts nothing under autocast: float32 stays float32, bf16 tokens + float32 pos give
    # float32 (timm under AMP), exactly as the reference computes inside the same autocast.
    x, pos = torch.randn(2, 8, 6), torch.randn(1, 8, 6)
    keep = _keep(2, 8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out32 = gather_tokens(x, keep, pos)
        mixed = gather_tokens(x.bfloat16(), keep, pos)
        ref_mixed = gather_tokens_reference(x.bfloat16(), keep, pos)
        tokens = torch.nn.functional.linear(torch.randn(2, 8, 6), torch.randn(6, 6))  # bf16 under AMP
        amp_out = gather_tokens(tokens, keep, pos)
    assert out32.dtype == torch.float32 and torch.equal(out32, gather_tokens_reference(x, keep, pos))
    assert mixed.dtype == torch.float32 and torch.equal(mixed, ref_mixed)
    assert tokens.dtype == torch.bfloat16 and amp_out.dtype == torch.float32


# ----------------------------------------------------------------------------- bad input
def _args():
    return torch.randn(2, 6, 4), torch.tensor([[0, 5], [2, 2]]), torch.randn(1, 6, 4)


BAD = [
    (lambda x, k, p: gather_tokens(x[0], k, p), ValueError, "3-D"),
    (lambda x, k, p: gather_tokens(x.int(), k, p), TypeError, "float32, float64, float16 or bfloat16"),
    (lambda x, k, p: gather_tokens(x.to(torch.complex64), k, p), TypeError, "float32, float64, float16"),
    (lambda x, k, p: gather_tokens(x, k.float(), p), TypeError, "int32 or int64"),
    (lambda x, k, p: gather_tokens(x, k.to(torch.int16), p), TypeError, "int32 or int64"),
    (lambda x, k, p: gather_tokens(x, k[0], p), ValueError, "2-D"),
    (lambda x, k, p: gather_tokens(x, k[:1], p), ValueError, "batch"),
    (lambda x, k, p: gather_tokens(x, k[:, :0], p), ValueError, "K >= 1"),
    (lambda x, k, p: gather_tokens(x[:, :0], k, None), ValueError, "L >= 1"),
    (lambda x, k, p: gather_tokens(x, k, p[:, :5]), ValueError, "pos_embed must have shape"),
    (lambda x, k, p: gather_tokens(x, k, p.expand(2, 6, 4)), ValueError, "pos_embed must have shape"),
    (lambda x, k, p: gather_tokens(x, k, p[..., :3]), ValueError, "pos_embed must have shape"),
    (lambda x, k, p: gather_tokens(x, k, p.int()), TypeError, "pos_embed must be float32"),
    (lambda x, k, p: gather_tokens(x, k, p.numpy()), TypeError, "tensor or None"),
    (lambda x, k, p: gather_tokens(x, k.tolist(), p), TypeError, "tensors"),
    (lambda x, k, p: gather_tokens(x, k, p.to("meta")), ValueError, "must be on"),
    (lambda x, k, p: gather_tokens(x, k.to("meta"), p), ValueError, "must be on"),
    (lambda x, k, p: gather_tokens(x, torch.tensor([[0, 6], [2, 2]]), p), ValueError, r"keep\[0, 1\] = 6 is outside \[0, 6\)"),
    (lambda x, k, p: gather_tokens(x, torch.tensor([[0, 1], [-1, 2]], dtype=torch.int32), p), ValueError, "outside"),
]


@pytest.mark.parametrize("call,exc,msg", BAD)
def test_bad_input(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(*_args())


@pytest.mark.parametrize("need", ["x", "pos"])
def test_bad_index_in_backward_raises(need):
    # The saved keep changed behind autograd's back (through .data, which does not bump the
    # version counter, so autograd's "modified by an inplace operation" check cannot fire):
    # the C++ backward range-checks the indices itself.
    x = torch.randn(2, 6, 4, requires_grad=need == "x")
    pos = torch.randn(6, 4, requires_grad=need == "pos")
    keep = torch.tensor([[0, 5], [2, 2]])
    out = gather_tokens(x, keep, pos)
    keep.data[1, 0] = 9
    assert keep._version == 0
    with pytest.raises(ValueError, match=r"keep\[1, 0\] = 9 is outside \[0, 6\)"):
        out.sum().backward()


@pytest.mark.parametrize(
    "args,msg",
    [
        ((torch.randn(2, 6), torch.zeros(2, 1, dtype=torch.long), None), "3-D"),
        ((torch.randn(2, 6, 4).int(), torch.zeros(2, 1, dtype=torch.long), None), "float32"),
        ((torch.randn(2, 6, 4), torch.zeros(2, 1), None), "int32 or int64"),
        ((torch.randn(2, 6, 4), torch.zeros(3, 1, dtype=torch.long), None), "batch"),
        ((torch.randn(2, 6, 4), torch.zeros(2, 0, dtype=torch.long), None), "K >= 1"),
        ((torch.randn(2, 6, 4), torch.zeros(2, 1, dtype=torch.long), torch.randn(6, 5)), "pos_embed"),
        ((torch.randn(2, 6, 4), torch.full((2, 1), 6), None), "outside"),
    ],
)
def test_bad_input_direct_op(args, msg):
    # A direct torch.ops call (no Python checks) fails as clearly, never crashes.
    with pytest.raises((RuntimeError, ValueError, TypeError), match=msg):
        torch.ops.effssl_kernels.gather_tokens(*args)


def test_bad_input_direct_backward_op():
    grad, keep = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    bwd = torch.ops.effssl_kernels.gather_tokens_backward
    with pytest.raises(RuntimeError, match="num_tokens"):
        bwd(grad, keep, 0, torch.float32, torch.float32, True, True)
    with pytest.raises(RuntimeError, match="tokens but keep has"):
        bwd(grad, keep[:, :2], 5, torch.float32, torch.float32, True, True)
    with pytest.raises(TypeError, match="x_dtype"):
        bwd(grad, keep, 5, torch.int32, torch.float32, True, False)
    with pytest.raises(ValueError, match="outside"):
        bwd(grad, keep + 5, 5, torch.float32, torch.float32, False, True)
