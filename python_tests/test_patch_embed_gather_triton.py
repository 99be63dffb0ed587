"""patch_embed_gather on the Triton path (EFFSSL_BACKEND=triton) against the reference.

On a GPU machine the kernels run on CUDA tensors; elsewhere on CPU tensors under
TRITON_INTERPRET=1 (conftest.py), so shapes stay tiny. Under the interpreter the dot is exact
float32 (bfloat16 operands are widened first); on a GPU float32 runs in TF32 unless disabled,
so the float32 tolerance is that of TF32 there.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from effssl_kernels.ops.patch_embed_gather import patch_embed_gather  # noqa: E402
from effssl_kernels.reference import patch_embed_gather_reference  # noqa: E402
from utils import HAS_GPU, INTERPRET, gpu_tile_choices, make_layout  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (HAS_GPU or INTERPRET), reason="needs a CUDA device or TRITON_INTERPRET=1"),
]

DEVICE = "cuda" if HAS_GPU else "cpu"
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4) if not HAS_GPU else dict(atol=5e-3, rtol=5e-3),
    torch.float16: dict(atol=4e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("EFFSSL_BACKEND", "triton")


def _inputs(N, C, H, W, D, p, K, dtype=torch.float32, bias=True, pos="3d", seed=0):
    g = torch.Generator().manual_seed(seed)
    L = (H // p) * (W // p)
    images = torch.rand(N, C, H, W, generator=g).to(dtype)
    weight = (torch.randn(D, C, p, p, generator=g) / math.sqrt(C * p * p)).to(dtype)
    b = torch.randn(D, generator=g).to(dtype) if bias else None
    keep = torch.randint(0, L, (N, K), generator=g)  # duplicates likely
    pe = None
    if pos is not None:
        pe = (0.02 * torch.randn(1, L, D, generator=g)).to(dtype)
        pe = pe[0] if pos == "2d" else pe
    return images, weight, b, keep, pe


def _dev(args):
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


def test_runs_the_triton_kernels(monkeypatch):
    # Guards every test below against a silent fall-back to the C++ kernel or the reference.
    import effssl_kernels.triton.patch_embed_gather as tpeg

    calls = []
    for name in ("patch_embed_gather_triton", "gather_patches_triton"):
        real = getattr(tpeg, name)
        monkeypatch.setattr(tpeg, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    args = _inputs(1, 3, 8, 8, 16, 4, 3)
    w = args[1].clone().requires_grad_()
    out = patch_embed_gather(*_dev([args[0], w, args[2], args[3], args[4]]))
    out.sum().backward()
    assert calls == ["patch_embed_gather_triton", "gather_patches_triton"]
    torch.testing.assert_close(out.cpu(), patch_embed_gather_reference(*args), **TOL[torch.float32])


def test_flop_counter_counts_the_patch_embedding():
    # FlopCounterMode counts an op without a formula as 0: the fused embedding looked free
    from torch.utils.flop_counter import FlopCounterMode

    images, weight, b, keep, pe = _dev(_inputs(2, 3, 8, 8, 16, 4, 3))
    with FlopCounterMode(display=False) as f:
        patch_embed_gather(images, weight, b, keep, pe)
    assert f.get_total_flops() == 2 * 2 * 3 * 16 * 3 * 4 * 4


SHAPES = [  # N, C, H, W, D, p, K
    (2, 3, 8, 8, 16, 4, 5),
    (1, 1, 8, 12, 17, 4, 3),  # C = 1, odd D, K-loop of 16 only
    (2, 3, 16, 8, 20, 8, 2),  # tails in rows, columns and the reduction
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(dtype, shape):
    args = _inputs(*shape, dtype=dtype, bias=shape[0] != 1, pos="2d" if shape[0] == 1 else "3d")
    out = patch_embed_gather(*_dev(args))
    ref = patch_embed_gather_reference(*args)
    assert out.device.type == DEVICE and out.dtype == ref.dtype
    torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])


@pytest.mark.skipif(HAS_GPU, reason="the GPU runs these tiles in every test")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 3, 16, 16, 70, 4, 45), (1, 2, 8, 8, 20, 4, 3)], ids=["m135", "m3"])
def test_gpu_tile_sizes_under_the_interpreter(monkeypatch, dtype, shape):
    # The launchers pick small tiles under the interpreter; here they pick what they pick on a
    # GPU (128 x 64 x 32, or 32 x 32 x 8 for float64; 64 x 64 for the patch gather), so the
    # masking of those tiles is checked before a GPU runs them: M = 135 rows (a second, nearly
    # empty row tile), D = 70 (a 6-column second tile), C*p*p = 48 (a half-full K step); and
    # M = 3, D = 20, where the tiles shrink to 16 x 32.
    import effssl_kernels.triton.patch_embed_gather as tpeg

    seen = gpu_tile_choices(monkeypatch, tpeg, ("_fwd_tiles", "_gather_tiles"))
    args = _inputs(*shape, dtype=dtype)
    leaves = [a.clone().requires_grad_(i != 3) if a is not None else None for i, a in enumerate(args)]
    out = patch_embed_gather(*leaves)
    torch.testing.assert_close(out, patch_embed_gather_reference(*args), **TOL[dtype])
    go = torch.randn_like(out)
    (gw,) = torch.autograd.grad(out, leaves[1], go)
    ref_leaves = [a.clone().requires_grad_(i != 3) if a is not None else None for i, a in enumerate(args)]
    (rw,) = torch.autograd.grad(patch_embed_gather_reference(*ref_leaves), ref_leaves[1], go)
    tol = TOL[dtype] if dtype != torch.bfloat16 else dict(atol=8e-2, rtol=3e-2)
    torch.testing.assert_close(gw, rw, **tol)
    big = shape[0] * shape[6] >= 128
    expect = (32, 32, 8, 4, 2) if dtype == torch.float64 else ((128, 64, 32, 8, 3) if big else (16, 32, 32, 4, 3))
    assert seen == [expect, (64, 64)], seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts_and_no_pos(layout, dtype):
    # without pos_embed the output stays in the half dtype through the NaN select of the
    # out-of-range rows (the bfloat16 case crashed the interpreter once)
    images, weight, bias, keep, _ = _inputs(2, 3, 8, 16, 16, 4, 4, dtype)
    got = patch_embed_gather(*_dev([make_layout(images, layout), weight, bias, keep, None]))
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu(), patch_embed_gather_reference(images, weight, bias, keep), **TOL[dtype])


@pytest.mark.parametrize("pos_dtype", [torch.float32, None])
def test_mixed_dtypes_amp_like(pos_dtype):
    # bf16 images and weight (what autocast hands the conv) with an fp32 pos -> fp32 output,
    # without pos -> bf16; and fp32 images with a bf16 weight (GEMM in fp32, as torch promotes)
    images, weight, bias, keep, pos = _inputs(2, 3, 8, 8, 16, 4, 5)
    pos = pos.to(pos_dtype) if pos_dtype is not None else None
    for imgs in (images.bfloat16(), images):
        args = [imgs, weight.bfloat16(), bias.bfloat16(), keep.int(), pos]
        out = patch_embed_gather(*_dev(args))
        ref = patch_embed_gather_reference(*args)
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out.cpu(), ref, **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(dtype):
    args = _inputs(2, 3, 8, 16, 16, 4, 6, dtype)  # non-square: Hp = 2, Wp = 4
    go = torch.randn(2, 6, 16).to(dtype)

    def grads(fn, args, device):
        leaves = [a.detach().to(device).requires_grad_(i != 3) if a is not None else None for i, a in enumerate(args)]
        out = fn(*leaves)
        return torch.autograd.grad(out, [leaves[i] for i in (0, 1, 2, 4)], go.to(device))

    gs = grads(patch_embed_gather, args, DEVICE)
    rgs = grads(patch_embed_gather_reference, args, "cpu")
    tol = dict(atol=2e-4, rtol=1e-4) if dtype == torch.float32 and not HAS_GPU else dict(atol=8e-2, rtol=3e-2)
    for name, g, r in zip(["images", "weight", "bias", "pos"], gs, rgs):
        assert g.dtype == r.dtype, name
        torch.testing.assert_close(g.cpu(), r, **tol, msg=lambda m: f"{name}: {m}")


def test_compile_fullgraph_forward_backward():
    args = _dev(_inputs(2, 3, 8, 8, 16, 4, 4))

    def step(images, weight, bias, keep, pos):
        return patch_embed_gather(images, weight, bias, keep, pos).square().mean()

    lc = [a.clone().requires_grad_(a.is_floating_point() and i > 0) for i, a in enumerate(args)]
    le = [a.clone().requires_grad_(a.is_floating_point() and i > 0) for i, a in enumerate(args)]
    out_c = torch.compile(step, fullgraph=True, backend="aot_eager")(*lc)
    out_e = step(*le)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(lc, le):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad)


def test_opcheck():
    images, weight, bias, keep, pos = _dev(_inputs(1, 3, 8, 8, 16, 4, 3))
    weight.requires_grad_()
    ops = torch.ops.effssl_kernels
    torch.library.opcheck(ops._patch_embed_gather_triton.default, (images, weight, bias, keep, pos),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(ops._gather_patches_triton.default, (images, keep, 4, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(HAS_GPU, reason="an out-of-range index is a device-side assert on CUDA")
def test_out_of_range_keep_raises():
    images, weight, bias, keep, pos = _inputs(1, 3, 8, 8, 16, 4, 3)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        patch_embed_gather(images, weight, bias, keep + 4, pos)


def test_kernel_writes_nan_for_out_of_range_rows():
    # What the compiled path (no eager check) gives: NaN rows, no read outside the image.
    from effssl_kernels.triton.patch_embed_gather import patch_embed_gather_triton

    images, weight, bias, keep, pos = _dev(_inputs(1, 3, 8, 8, 16, 4, 3))
    keep = keep.clone()
    keep[0, 1] = 1000
    out = patch_embed_gather_triton(images, weight, bias, keep, pos).cpu()
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, [0, 2]]).all()


def test_non_contiguous_weight_and_keep():
    # the launchers make weight and keep contiguous: the kernels index them as [D, C*p*p] and [N*K]
    images, weight, bias, keep, pos = _dev(_inputs(2, 3, 16, 16, 10, 4, 6))
    w_nc = weight.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).requires_grad_()
    keep_nc = torch.cat([keep, keep], 1)[:, ::2]
    assert not w_nc.is_contiguous() and not keep_nc.is_contiguous()
    w_ref = weight.detach().cpu().requires_grad_()
    out = patch_embed_gather(images, w_nc, bias, keep_nc, pos)
    ref = patch_embed_gather_reference(images.cpu(), w_ref, bias.cpu(), keep_nc.cpu(), pos.cpu())
    torch.testing.assert_close(out.detach().cpu(), ref.detach(), **TOL[torch.float32])
    go = torch.randn(ref.shape)
    (gw,) = torch.autograd.grad(out, w_nc, go.to(DEVICE))
    (rw,) = torch.autograd.grad(ref, w_ref, go)
    torch.testing.assert_close(gw.cpu(), rw, **TOL[torch.float32])


def test_image_gradient_sums_duplicates_in_float32():
    # 300 copies of one patch: a bfloat16 running sum stalls at 256, a float32 one reaches 300
    images = torch.rand(1, 1, 4, 4, device=DEVICE).bfloat16().requires_grad_()
    weight = torch.ones(1, 1, 4, 4, dtype=torch.bfloat16, device=DEVICE)
    keep = torch.zeros(1, 300, dtype=torch.long, device=DEVICE)
    out = patch_embed_gather(images, weight, None, keep)
    (gi,) = torch.autograd.grad(out, images, torch.ones_like(out))
    assert gi.dtype == torch.bfloat16
    assert torch.equal(gi.cpu(), torch.full((1, 1, 4, 4), 300.0, dtype=torch.bfloat16))
