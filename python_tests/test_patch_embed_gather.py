"""patch_embed_gather on the C++ CPU path against the reference (and timm's PatchEmbed)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effssl_kernels.ops.patch_embed_gather import patch_embed_gather
from effssl_kernels.reference import patch_embed_gather_reference
from utils import DTYPES, INTERPRET, make_layout

# Against the reference in the same dtype. Only the summation order of the GEMM differs (conv vs
# mm); low precision outputs may differ by one rounding step of values around 1-4.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}
# Gradients (sums over N*K rows or up to D products) get a little more.
GRAD_TOL = {
    torch.float32: dict(atol=2e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=5e-3),
    torch.bfloat16: dict(atol=8e-2, rtol=3e-2),
}


def _inputs(N, C, H, W, D, p, K, dtype=torch.float32, bias=True, pos="3d", dup=False, seed=0):
    """Images in [0, 1), weight scaled so outputs are O(1), keep random (with duplicates if dup)."""
    g = torch.Generator().manual_seed(seed)
    L = (H // p) * (W // p)
    images = torch.rand(N, C, H, W, generator=g).to(dtype)
    weight = (torch.randn(D, C, p, p, generator=g) / math.sqrt(C * p * p)).to(dtype)
    b = torch.randn(D, generator=g).to(dtype) if bias else None
    if dup or K > L:
        keep = torch.randint(0, L, (N, K), generator=g)
    else:
        keep = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(N)])
    pe = None
    if pos is not None:
        pe = (0.02 * torch.randn(1, L, D, generator=g)).to(dtype)
        if pos == "2d":
            pe = pe[0]
    return images, weight, b, keep, pe


SHAPES = [  # N, C, H, W, D, p, K
    (2, 3, 32, 32, 24, 16, 3),
    (2, 3, 28, 42, 17, 14, 5),  # odd D, non-square image, p = 14
    (3, 1, 16, 24, 8, 4, 11),  # C = 1
    (1, 3, 24, 16, 33, 8, 6),
    (2, 4, 8, 8, 7, 4, 1),  # K = 1
]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias,pos", [(True, "3d"), (False, "2d"), (True, None)])
def test_matches_reference(dtype, shape, bias, pos):
    N, C, H, W, D, p, K = shape
    args = _inputs(N, C, H, W, D, p, K, dtype, bias=bias, pos=pos)
    out = patch_embed_gather(*args)
    ref = patch_embed_gather_reference(*args)
    assert out.shape == (N, K, D) and out.dtype == ref.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_torch(dtype):
    # flash-attention rule: error against a float64 oracle at most twice that of torch's own run
    args = _inputs(4, 3, 64, 64, 48, 16, 9, dtype, dup=True)
    exact = patch_embed_gather_reference(*[a.double() if a.is_floating_point() else a for a in args])
    ours = (patch_embed_gather(*args).double() - exact).abs().max()
    torch_err = (patch_embed_gather_reference(*args).double() - exact).abs().max()
    assert ours <= 2 * torch_err + 1e-6, (ours, torch_err)


@pytest.mark.parametrize("p", [4, 8, 14, 16])
def test_all_patches_equal_timm_patch_embed(p):
    # K = L with keep = arange: exactly timm's PatchEmbed + pos_embed
    timm_layers = pytest.importorskip("timm.layers")
    H = W = 4 * p
    pe = timm_layers.PatchEmbed(img_size=H, patch_size=p, in_chans=3, embed_dim=40)
    images = torch.rand(2, 3, H, W)
    L = pe.num_patches
    pos = 0.02 * torch.randn(1, L, 40)
    keep = torch.arange(L).expand(2, L)
    with torch.no_grad():
        expect = pe(images) + pos
        got = patch_embed_gather(images, pe.proj.weight, pe.proj.bias, keep, pos)
    torch.testing.assert_close(got, expect, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_duplicates_and_order(dtype):
    images, weight, bias, _, pos = _inputs(2, 3, 32, 32, 16, 8, 0, dtype)
    keep = torch.tensor([[5, 5, 0, 15, 5, 3], [15, 14, 15, 15, 0, 0]])
    out = patch_embed_gather(images, weight, bias, keep, pos)
    torch.testing.assert_close(out, patch_embed_gather_reference(images, weight, bias, keep, pos), **TOL[dtype])
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 0], out[0, 4])
    assert torch.equal(out[1, 0], out[1, 2])


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts(layout, dtype):
    images, weight, bias, keep, pos = _inputs(2, 3, 24, 40, 12, 8, 7, dtype, dup=True)
    strided = make_layout(images, layout)
    got = patch_embed_gather(strided, weight, bias, keep, pos[0].t().contiguous().t())  # strided pos too
    expect = patch_embed_gather(images.contiguous(), weight, bias, keep, pos)
    assert torch.equal(got, expect)
    torch.testing.assert_close(got, patch_embed_gather_reference(images, weight, bias, keep, pos), **TOL[dtype])


def test_non_contiguous_weight_and_keep():
    images, weight, bias, keep, pos = _inputs(2, 3, 16, 16, 10, 4, 6)
    w_nc = weight.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    keep_nc = torch.cat([keep, keep], 1)[:, ::2]
    assert not w_nc.is_contiguous() and not keep_nc.is_contiguous()
    torch.testing.assert_close(patch_embed_gather(images, w_nc, bias, keep_nc, pos),
                               patch_embed_gather_reference(images, weight, bias, keep_nc, pos))


@pytest.mark.parametrize("kdt", [torch.int32, torch.int64, torch.int16, torch.uint8])
def test_keep_dtypes(kdt):
    args = list(_inputs(2, 3, 16, 16, 8, 4, 5))
    expect = patch_embed_gather_reference(*args)
    args[3] = args[3].to(kdt)
    torch.testing.assert_close(patch_embed_gather(*args), expect)


@pytest.mark.parametrize(
    "dts",
    [  # images, weight, bias, pos
        (torch.float32, torch.bfloat16, torch.bfloat16, torch.float32),  # AMP-like: fp32 out
        (torch.float16, torch.float32, torch.float32, torch.float16),  # fp32 GEMM, fp32 out
        (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float16),  # bf16 + fp16 -> fp32
        (torch.float32, torch.float32, torch.float32, torch.float64),  # fp32 GEMM, fp64 add
        (torch.float16, torch.float16, None, torch.float16),
    ],
)
def test_mixed_dtypes_promote(dts):
    images, weight, bias, keep, pos = _inputs(2, 3, 16, 16, 12, 4, 6, dup=True)
    images, weight, pos = images.to(dts[0]), weight.to(dts[1]), pos.to(dts[3])
    bias = None if dts[2] is None else bias.to(dts[2])
    out = patch_embed_gather(images, weight, bias, keep, pos)
    ref = patch_embed_gather_reference(images, weight, bias, keep, pos)
    assert out.dtype == ref.dtype
    gemm_dt = torch.promote_types(dts[0], dts[1])
    torch.testing.assert_close(out, ref, **TOL[gemm_dt])


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="the Triton kernel runs on CPU tensors only under TRITON_INTERPRET=1"))])
@pytest.mark.parametrize("gemm_dt,pos_dt", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                            (torch.float32, torch.float64)], ids=str)
def test_pos_added_to_the_rounded_conv_output(monkeypatch, backend, gemm_dt, pos_dt):
    # timm's order: the conv's output in its dtype, then + pos_embed in the promoted dtype. So
    # the fused op equals the op without pos plus pos, bit for bit: the conv rounded to the GEMM
    # dtype before the add, and a float64 pos added in float64 (not rounded through float32)
    monkeypatch.setenv("EFFSSL_BACKEND", backend)
    images, weight, bias, keep, pos = _inputs(2, 3, 16, 16, 32, 4, 7, dup=True)
    images, weight, bias, pos = images.to(gemm_dt), weight.to(gemm_dt), bias.to(gemm_dt), pos.to(pos_dt)
    out = patch_embed_gather(images, weight, bias, keep, pos)
    want = patch_embed_gather(images, weight, bias, keep, None) + pos[0][keep]
    assert out.dtype == want.dtype == pos_dt
    assert torch.equal(out, want)


def test_empty_batch():
    images, weight, bias, _, pos = _inputs(1, 3, 16, 16, 8, 4, 2)
    out = patch_embed_gather(images[:0], weight, bias, torch.zeros(0, 3, dtype=torch.long), pos)
    assert out.shape == (0, 3, 8)


@pytest.mark.parametrize("empty", ["batch", "channels"])
def test_empty_backward(empty):
    # backward of an empty batch (N = 0) or of no channels (C = 0): zero gradients, no crash
    N, C = (0, 3) if empty == "batch" else (2, 0)
    images = torch.randn(N, C, 8, 8, requires_grad=True)
    weight = torch.randn(4, C, 4, 4, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    keep = torch.zeros(N, 2, dtype=torch.long)
    out = patch_embed_gather(images, weight, bias, keep)
    torch.testing.assert_close(out, patch_embed_gather_reference(images, weight, bias, keep))  # [N, 2, 4]
    out.sum().backward()
    assert images.grad.shape == images.shape and weight.grad.shape == weight.shape
    assert not weight.grad.any() and not images.grad.any()
    torch.testing.assert_close(bias.grad, torch.full((4,), float(N * 2)))


# ----------------------------------------------------------------------------- the helper ops
def test_gather_patches_is_unfold():
    images, _, _, keep, _ = _inputs(2, 3, 24, 16, 4, 8, 5, dup=True)
    cols = torch.ops.effssl_kernels._gather_patches(make_layout(images, "sliced"), keep, 8, torch.bfloat16)
    unf = F.unfold(images, 8, stride=8).transpose(1, 2)  # [N, L, C*p*p], columns (c, ky, kx)
    expect = unf.gather(1, keep[..., None].expand(-1, -1, unf.shape[-1])).bfloat16()
    assert cols.dtype == torch.bfloat16 and torch.equal(cols, expect)


def test_scatter_is_adjoint_of_gather():
    # <gather(x), c> == <x, scatter(c)> in float64, duplicates included
    x = torch.randn(2, 2, 12, 8, dtype=torch.float64)
    keep = torch.tensor([[0, 5, 5, 2], [1, 1, 1, 4]])
    c = torch.randn(2, 4, 2 * 16, dtype=torch.float64)
    gx = torch.ops.effssl_kernels._gather_patches(x, keep, 4, torch.float64)
    sc = torch.ops.effssl_kernels._scatter_patches(c, keep, 4, 12, 8, torch.float64)
    torch.testing.assert_close((gx * c).sum(), (x * sc).sum())
    # float32 output of bf16 columns sums duplicates in float32, rounding once
    cb = c.bfloat16()
    s32 = torch.ops.effssl_kernels._scatter_patches(cb, keep, 4, 12, 8, torch.float32)
    s64 = torch.ops.effssl_kernels._scatter_patches(cb.double(), keep, 4, 12, 8, torch.float64)
    torch.testing.assert_close(s32, s64.float(), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- gradients
def _grads(fn, args, go, wrt):
    leaves = [a.detach().requires_grad_(i in wrt) if a is not None and a.is_floating_point() else a
              for i, a in enumerate(args)]
    out = fn(*leaves)
    gs = torch.autograd.grad(out, [leaves[i] for i in wrt], go)
    return out, gs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos", ["3d", "2d"])
def test_gradients_match_reference(dtype, pos):
    args = _inputs(3, 3, 32, 24, 20, 8, 9, dtype, pos=pos, dup=True)
    go = torch.randn(3, 9, 20).to(dtype)
    wrt = [0, 1, 2, 4]
    out, gs = _grads(patch_embed_gather, args, go, wrt)
    ref, rgs = _grads(patch_embed_gather_reference, args, go, wrt)
    for name, g, r in zip(["images", "weight", "bias", "pos"], gs, rgs):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        torch.testing.assert_close(g, r, **GRAD_TOL[dtype], msg=lambda m: f"{name}: {m}")


def test_gradients_mixed_dtypes():
    # bf16 GEMM, fp32 images/pos/out: grads come back in each input's dtype
    images, weight, bias, keep, pos = _inputs(2, 3, 16, 16, 12, 4, 10, dup=True)
    args = (images, weight.bfloat16(), bias.bfloat16(), keep, pos)
    go = torch.randn(2, 10, 12)
    out, gs = _grads(patch_embed_gather, args, go, [0, 1, 2, 4])
    ref, rgs = _grads(patch_embed_gather_reference, args, go, [0, 1, 2, 4])
    assert out.dtype == torch.float32
    for g, r in zip(gs, rgs):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g.float(), r.float(), **GRAD_TOL[torch.bfloat16])


@pytest.mark.parametrize("wrt", [[1], [2], [4], [1, 2], [0]])
def test_partial_gradients(wrt):
    args = _inputs(2, 3, 16, 16, 8, 4, 6, dup=True)
    go = torch.randn(2, 6, 8)
    _, gs = _grads(patch_embed_gather, args, go, wrt)
    _, rgs = _grads(patch_embed_gather_reference, args, go, wrt)
    for g, r in zip(gs, rgs):
        torch.testing.assert_close(g, r, **GRAD_TOL[torch.float32])


def test_backward_deterministic():
    # 2400 rows: past the pos scatter's grain (16384 / D = 1024) and the patch gather's (4096 /
    # (C p p) = 21), so 2 threads really split the C++ loops; 1 and 2 threads must agree bitwise
    args = _inputs(4, 3, 32, 32, 16, 8, 600, dup=True)
    go = torch.randn(4, 600, 16)
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2, 2):
            torch.set_num_threads(t)
            runs.append(_grads(patch_embed_gather, args, go, [0, 1, 2, 4])[1])
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(r, runs[0]))


@pytest.mark.parametrize("bias,pos", [(True, "3d"), (False, "2d"), (True, None)])
def test_gradcheck_float64(bias, pos):
    images, weight, b, _, pe = _inputs(2, 2, 8, 8, 3, 4, 0, torch.float64, bias=bias, pos=pos)
    keep = torch.tensor([[0, 3, 3, 2], [1, 1, 1, 2]])
    args = [t.requires_grad_() if t is not None else None for t in (images, weight, b)] + [keep]
    args.append(pe.requires_grad_() if pe is not None else None)
    assert torch.autograd.gradcheck(patch_embed_gather, args)


def test_gradgradcheck_float64():
    # the backward is built from differentiable pieces (gather and scatter are adjoint ops)
    images, weight, b, _, pe = _inputs(1, 1, 8, 8, 2, 4, 0, torch.float64)
    keep = torch.tensor([[3, 0, 3]])
    args = [images.requires_grad_(), weight.requires_grad_(), b.requires_grad_(), keep, pe.requires_grad_()]
    assert torch.autograd.gradgradcheck(patch_embed_gather, args)


# ----------------------------------------------------------------------------- torch.library / compile
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(requires_grad, dtype):
    images, weight, bias, keep, pos = _inputs(2, 3, 16, 12, 6, 4, 5, dtype, dup=True)
    for t in (images, weight, bias, pos):
        t.requires_grad_(requires_grad)
    ops = torch.ops.effssl_kernels
    torch.library.opcheck(ops.patch_embed_gather.default, (images, weight, bias, keep, pos))
    torch.library.opcheck(ops.patch_embed_gather.default, (images, weight, None, keep.int(), None))
    torch.library.opcheck(ops._gather_patches.default, (images, keep, 4, torch.float32))
    cols = torch.randn(2, 5, 48, dtype=dtype)
    torch.library.opcheck(ops._scatter_patches.default, (cols, keep, 4, 16, 12, torch.float32))
    if dtype != torch.float32:  # a float32 pos_embed promotes the output, as timm's add does
        torch.library.opcheck(ops.patch_embed_gather.default, (images, weight, bias, keep, pos.float()))


def test_compile_fullgraph_forward_backward():
    def step(images, weight, bias, keep, pos):
        return patch_embed_gather(images, weight, bias, keep, pos).square().mean()

    args = _inputs(2, 3, 32, 32, 16, 8, 6, dup=True)
    leaves_c = [a.clone().requires_grad_(i != 0) if a.is_floating_point() else a for i, a in enumerate(args)]
    leaves_e = [a.clone().requires_grad_(i != 0) if a.is_floating_point() else a for i, a in enumerate(args)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    lc, le = compiled(*leaves_c), step(*leaves_e)
    lc.backward()
    le.backward()
    torch.testing.assert_close(lc, le)
    for a, b in zip(leaves_c, leaves_e):
        if a.is_floating_point() and a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad)


def _timm_path(images, weight, bias, keep, pos):
    """timm's unfused path: conv patch embed -> flatten/transpose -> + pos -> gather."""
    x = F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = x + pos
    return x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))


def test_autocast_cpu_bfloat16():
    # Casting happens in the Python wrapper (F.conv2d's rule for images, weight, bias); the pos add
    # then promotes, so bf16 tokens + fp32 pos -> fp32, exactly what timm's path gives.
    images, weight, bias, keep, pos = _inputs(2, 3, 32, 32, 16, 8, 7, dup=True)
    go = torch.randn(2, 7, 16)
    leaves = [t.clone().requires_grad_() for t in (weight, bias, pos)]
    timm_leaves = [t.clone().requires_grad_() for t in (weight, bias, pos)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = patch_embed_gather(images, leaves[0], leaves[1], keep, leaves[2])
        expect = _timm_path(images, timm_leaves[0], timm_leaves[1], keep, timm_leaves[2])
        compiled = torch.compile(patch_embed_gather, fullgraph=True, backend="aot_eager")(
            images, weight, bias, keep, pos)
    assert out.dtype == expect.dtype == compiled.dtype == torch.float32
    torch.testing.assert_close(out, expect, **TOL[torch.bfloat16])
    torch.testing.assert_close(compiled, out)
    # the GEMM really ran in bf16: the result differs from the fp32 one by bf16-sized steps
    assert (out - patch_embed_gather(images, weight, bias, keep, pos)).abs().max() > 1e-4
    out.backward(go)
    expect.backward(go)
    for a, b in zip(leaves, timm_leaves):
        assert a.grad.dtype == b.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, b.grad, **GRAD_TOL[torch.bfloat16])


def test_autocast_keeps_float64():
    images, weight, bias, keep, pos = _inputs(1, 3, 16, 16, 8, 4, 3, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = patch_embed_gather(images, weight, bias, keep, pos)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, patch_embed_gather_reference(images, weight, bias, keep, pos))


def test_reference_backend_env(monkeypatch):
    args = _inputs(2, 3, 16, 16, 8, 4, 5)
    monkeypatch.setenv("EFFSSL_BACKEND", "reference")
    assert torch.equal(patch_embed_gather(*args), patch_embed_gather_reference(*args))


# ----------------------------------------------------------------------------- shape fuzzing
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    N=st.integers(1, 3), C=st.integers(1, 4), hp=st.integers(1, 4), wp=st.integers(1, 4), p=st.integers(1, 9),
    D=st.integers(1, 20), K=st.integers(1, 12), dtype=st.sampled_from(DTYPES), bias=st.booleans(),
    pos=st.sampled_from([None, "2d", "3d"]), layout=st.sampled_from(["contiguous", "channels_last", "sliced"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_shapes(N, C, hp, wp, p, D, K, dtype, bias, pos, layout, seed):
    images, weight, b, keep, pe = _inputs(N, C, hp * p, wp * p, D, p, K, dtype, bias=bias, pos=pos, dup=True, seed=seed)
    out = patch_embed_gather(make_layout(images, layout), weight, b, keep, pe)
    torch.testing.assert_close(out, patch_embed_gather_reference(images, weight, b, keep, pe), **TOL[dtype])


# ----------------------------------------------------------------------------- bad input
def _good():
    return list(_inputs(2, 3, 16, 16, 8, 4, 3))


def _with(i, v):
    args = _good()
    args[i] = v(args[i]) if callable(v) else v
    return args


BAD = [
    (_with(0, lambda x: x[0]), ValueError, "4-D"),
    (_with(0, lambda x: x[..., :15]), ValueError, "divisible by the patch size"),
    (_with(0, lambda x: x[:, :2]), ValueError, "input channels"),
    (_with(0, lambda x: x.int()), TypeError, "images must be float"),
    (_with(0, lambda x: x.numpy()), TypeError, "images must be a tensor"),
    (_with(1, lambda w: w[..., :3]), ValueError, "square"),
    (_with(1, lambda w: w[0]), ValueError, "square"),
    (_with(1, lambda w: w.to(torch.complex64)), TypeError, "weight must be float"),
    (_with(2, lambda b: b[:5]), ValueError, "bias must have shape"),
    (_with(2, lambda b: b.int()), TypeError, "bias must be float"),
    (_with(3, lambda k: k.float()), TypeError, "integer"),
    (_with(3, lambda k: k.bool()), TypeError, "integer"),
    (_with(3, lambda k: k[0]), ValueError, r"\[N, K\]"),
    (_with(3, lambda k: k[:, :0]), ValueError, "K >= 1"),
    (_with(3, lambda k: k[:1]), ValueError, r"\[N, K\]"),
    (_with(3, lambda k: k + 16), ValueError, r"outside \[0, \d+\)"),
    (_with(3, lambda k: k - 16), ValueError, r"outside \[0, \d+\)"),
    (_with(4, lambda p: p[:, :15]), ValueError, "pos_embed must have shape"),
    (_with(4, lambda p: p.expand(2, -1, -1)), ValueError, "pos_embed must have shape"),
    (_with(4, lambda p: p.long()), TypeError, "pos_embed must be float"),
    (_with(4, 3.0), TypeError, "pos_embed must be a tensor or None"),
]


@pytest.mark.parametrize("args,exc,msg", BAD)
def test_bad_input(args, exc, msg):
    with pytest.raises(exc, match=msg):
        patch_embed_gather(*args)


@pytest.mark.parametrize(
    "i,v,msg",
    [
        (0, lambda x: x[..., :15], "divisible"),
        (0, lambda x: x.int(), "images must be"),
        (1, lambda w: w[..., :3], "square"),
        (2, lambda b: b.double(), "bias must have weight's dtype"),
        (3, lambda k: k + 16, r"\[0, L\)"),
        (3, lambda k: k.short(), "int32 or int64"),
        (4, lambda p: p[:, :15], "pos_embed must be"),
    ],
)
def test_bad_input_direct_op(i, v, msg):
    # The C++ op checks its arguments itself: a direct torch.ops call fails clearly, never crashes.
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.effssl_kernels.patch_embed_gather(*_with(i, v))


def test_zero_width_direct_op():
    # D = 0 through the op itself (the public function refuses it): an empty result, no division
    # by zero in the positional add's grain size
    out = torch.ops.effssl_kernels.patch_embed_gather(
        torch.rand(1, 3, 8, 8), torch.randn(0, 3, 4, 4), torch.randn(0), torch.tensor([[0, 1]]), torch.randn(4, 0))
    assert out.shape == (1, 2, 0)


def test_bad_input_helper_ops():
    ops = torch.ops.effssl_kernels
    x, keep = torch.rand(2, 3, 16, 16), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"\[0, L\)"):
        ops._gather_patches(x, keep + 16, 4, torch.float32)
    with pytest.raises(RuntimeError, match="floating-point"):
        ops._gather_patches(x, keep, 4, torch.int32)
    with pytest.raises(RuntimeError, match=r"\[0, L\)"):
        ops._scatter_patches(torch.rand(2, 3, 48), keep - 1, 4, 16, 16, torch.float32)
    with pytest.raises(RuntimeError, match="matching cols"):
        ops._scatter_patches(torch.rand(2, 4, 48), keep, 4, 16, 16, torch.float32)


def test_mixed_devices_rejected():
    args = _good()
    args[1] = args[1].to("meta")
    with pytest.raises(ValueError, match="weight must be on cpu"):
        patch_embed_gather(*args)


def test_autocast_rounds_images_before_a_float64_gemm():
    # autocast casts float32 images to bf16 (F.conv2d's rule) but leaves a float64 weight and
    # bias alone: the GEMM then runs in float64 on the bf16-rounded images
    images, weight, bias, keep, pos = _inputs(1, 3, 16, 16, 8, 4, 3)
    weight, bias = weight.double(), bias.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = patch_embed_gather(images, weight, bias, keep, pos)
    assert out.dtype == torch.float64
    expect = patch_embed_gather_reference(images.bfloat16(), weight, bias, keep, pos)
    torch.testing.assert_close(out, expect, **TOL[torch.float64])


def test_reference_backend_under_autocast_no_channels(monkeypatch):
    # EFFSSL_BACKEND=reference casts the images as the kernels do; with C = 0 the reference's
    # zero branch does not run under conv2d's autocast, so only that cast gives bf16 here
    monkeypatch.setenv("EFFSSL_BACKEND", "reference")
    images, weight, bias = torch.rand(2, 0, 8, 8), torch.randn(4, 0, 4, 4), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = patch_embed_gather(images, weight, bias, torch.zeros(2, 3, dtype=torch.long))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, bias.bfloat16().expand(2, 3, 4))


def test_scatter_sums_float32_cols_in_float64_for_a_float64_output():
    # float32 column gradients scattered into a float64 image (autocast with float64 images):
    # duplicates summed in float64, so 1 + 2**-30 survives (a float32 sum rounds it to 1; audit 96)
    cols = torch.tensor([[[1.0], [2.0 ** -30]]])  # N = 1, K = 2 (patch 0 twice), C*p*p = 1
    got = torch.ops.effssl_kernels._scatter_patches(cols, torch.tensor([[0, 0]]), 1, 1, 1, torch.float64)
    assert got.dtype == torch.float64 and got.item() == 1.0 + 2.0 ** -30
