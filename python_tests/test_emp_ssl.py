"""EMP-SSL's step pieces (effssl_kernels/emp_ssl.py) against the plain formulas of EMP-SSL's code:
patch order, the loss and its gradients (float64, tight), and a many-patch step on a tiny plain
and block-sparse ResNet."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, ResNet

import effssl_kernels as ek
from effssl_kernels.emp_ssl import bag_of_features, emp_ssl_loss, emp_ssl_patches


def _plain_loss(z_flat, P, lam, eps):
    """EMP-SSL's code, loop for loop: chunk, mean, cosine to the mean, logdet of the d x d matrix
    with its ``scalar = d / (b * eps)`` (eps = 0.2 there: not squared)."""
    z = F.normalize(z_flat, dim=-1)
    z_list = z.chunk(P, dim=0)
    z_avg = torch.stack(list(z_list)).mean(0)
    sim = sum(F.cosine_similarity(zi, z_avg, dim=1).mean() for zi in z_list) / P
    tcr = 0
    for zi in z_list:
        b, d = zi.shape
        eye = torch.eye(d, dtype=zi.dtype)
        tcr = tcr + 0.5 * torch.logdet(eye + d / (b * eps) * zi.T @ zi)
    return -lam * sim - tcr / P


@pytest.mark.parametrize("P,N,d", [(4, 6, 10), (3, 12, 5), (1, 3, 4)])
def test_loss_matches_emp_ssl_code(P, N, d):
    torch.manual_seed(0)
    z = torch.randn(P * N, d, dtype=torch.float64, requires_grad=True)
    loss, parts = emp_ssl_loss(z, P)  # the defaults are EMP-SSL's (lam 200, its code's eps 0.2)
    want = _plain_loss(z, P, 200.0, 0.2)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    g, = torch.autograd.grad(loss, z)
    gw, = torch.autograd.grad(want, z)
    torch.testing.assert_close(g, gw, rtol=1e-8, atol=1e-10)
    # [P, N, d] input is the same
    loss3, _ = emp_ssl_loss(z.view(P, N, d), P)
    torch.testing.assert_close(loss3, loss)
    assert set(parts) == {"invariance", "tcr"}
    assert not parts["tcr"].requires_grad and not parts["invariance"].requires_grad  # logged, not trained


def test_normalize_false_takes_the_rows_as_they_are():
    torch.manual_seed(5)
    z = torch.randn(3 * 4, 6, dtype=torch.float64) * 3  # rows far from unit norm
    loss, _ = emp_ssl_loss(z, 3, normalize=False)
    # EMP-SSL's code without its F.normalize
    zs = list(z.chunk(3))
    z_avg = torch.stack(zs).mean(0)
    sim = sum(F.cosine_similarity(zi, z_avg, dim=1).mean() for zi in zs) / 3
    tcr = sum(0.5 * torch.logdet(torch.eye(6, dtype=z.dtype) + 6 / (4 * 0.2) * zi.T @ zi) for zi in zs) / 3
    torch.testing.assert_close(loss, -200.0 * sim - tcr, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(loss, emp_ssl_loss(z, 3)[0])
    # unit rows: the same either way
    zn = F.normalize(z, dim=-1)
    torch.testing.assert_close(emp_ssl_loss(zn, 3, normalize=False)[0], emp_ssl_loss(zn, 3)[0])


def test_loss_float32_and_gradcheck():
    torch.manual_seed(1)
    z = torch.randn(3 * 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: emp_ssl_loss(t, 3, lam=2.0)[0], (z,))
    loss32, _ = emp_ssl_loss(z.detach().float(), 3, lam=2.0)
    torch.testing.assert_close(loss32.double(), emp_ssl_loss(z.detach(), 3, lam=2.0)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_embeddings_with_a_zero_row(dtype):
    # A ReLU projector under AMP can give an all-zero row: normalised in float16 it was 0/0 = NaN.
    torch.manual_seed(3)
    z = torch.randn(6, 4)
    z[0] = 0
    want, parts_want = emp_ssl_loss(z.to(dtype).float(), 2)
    zh = z.to(dtype).requires_grad_()
    got, parts = emp_ssl_loss(zh, 2)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(parts["tcr"], parts_want["tcr"], rtol=0, atol=0)
    (g,) = torch.autograd.grad(got, zh)
    z32 = z.to(dtype).float().requires_grad_()
    (g32,) = torch.autograd.grad(emp_ssl_loss(z32, 2)[0], z32)
    # the zero row's gradient is F.normalize's 1/eps one (~1e21 in float32, inf in float16)
    assert g.dtype == dtype
    torch.testing.assert_close(g[1:], g32[1:].to(dtype), rtol=0, atol=0)


def test_compiled_loss_matches_eager():
    torch.manual_seed(4)
    z = torch.randn(3 * 4, 6, requires_grad=True)
    compiled = torch.compile(lambda t: emp_ssl_loss(t, 3, check=False)[0], fullgraph=True)
    got = compiled(z)
    want = emp_ssl_loss(z, 3)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(got, z)
    (gw,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(g, gw, rtol=1e-4, atol=1e-5)


def test_invariance_term_rewards_agreeing_patches():
    torch.manual_seed(2)
    base = torch.randn(1, 8, 16)
    same = base.expand(5, 8, 16).reshape(40, 16)
    noisy = (base + torch.randn(5, 8, 16)).reshape(40, 16)
    assert emp_ssl_loss(same, 5)[1]["invariance"] > 0.999
    assert emp_ssl_loss(noisy, 5)[1]["invariance"] < 0.9


def test_patches_are_patch_major_multi_crops():
    images = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)
    got = emp_ssl_patches(images, 4, 8, generator=torch.Generator().manual_seed(5))
    boxes, flips = ek.random_resized_boxes(3, 4, (20, 24), (0.25, 0.25), (1.0, 1.0),
                                           generator=torch.Generator().manual_seed(5))
    crops = ek.multi_crop(images, boxes, flips, 8, out_dtype=torch.float32) / 255  # image-major
    assert got.shape == (12, 3, 8, 8) and got.dtype == torch.float32
    for i in range(4):
        for n in range(3):
            torch.testing.assert_close(got[i * 3 + n], crops[n * 4 + i], rtol=0, atol=1e-7)


def test_patches_are_written_in_chunks_not_copied_whole(monkeypatch):
    # The image-major crops were transposed into a second, patch-major copy: twice the patches'
    # memory at the peak. Now each multi_crop makes an eighth of them, copied into its rows.
    import effssl_kernels.emp_ssl as E

    sizes, real = [], E.multi_crop
    monkeypatch.setattr(E, "multi_crop", lambda *a, **k: sizes.append(real(*a, **k).shape[0]) or real(*a, **k))
    images = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)
    got = emp_ssl_patches(images, 20, 8, generator=torch.Generator().manual_seed(5))
    assert sizes == [3 * 3] * 6 + [3 * 2] and sum(sizes) == got.shape[0] == 60
    boxes, flips = ek.random_resized_boxes(3, 20, (20, 24), (0.25, 0.25), (1.0, 1.0),
                                           generator=torch.Generator().manual_seed(5))
    want = real(images, boxes, flips, 8, out_dtype=torch.float32).mul_(1 / 255)
    torch.testing.assert_close(got, want.view(3, 20, 3, 8, 8).transpose(0, 1).reshape(60, 3, 8, 8),
                               rtol=0, atol=0)


def test_default_patches_are_emp_ssl_square_quarters():
    # EMP-SSL: RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1, 1)): on 32 px images every box is
    # a 16 x 16 square, so 16 px patches copy pixels (x steps of exactly 1, mirrored when flipped)
    images = torch.arange(32.0).expand(4, 3, 32, 32).contiguous()
    p = emp_ssl_patches(images, 10, 16, generator=torch.Generator().manual_seed(0))
    steps = p[..., 1:] - p[..., :-1]
    assert bool(((steps.abs() == 1) & (steps == steps[..., :1])).all())


def test_out_dtypes():
    u8 = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    for bad in (torch.uint8, torch.float64, "float32"):  # named as emp_ssl_patches, not multi_crop
        with pytest.raises(TypeError, match="emp_ssl_patches: out_dtype must be None, float32"):
            emp_ssl_patches(u8, 2, 4, out_dtype=bad)
    assert emp_ssl_patches(u8, 2, 4, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert emp_ssl_patches(u8.double(), 2, 4, out_dtype=torch.float64).dtype == torch.float64
    # float64 images to the lower floats the docstrings allow (a TypeError until 2026-12-06)
    f64 = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        want = emp_ssl_patches(f64, 3, 8, generator=g()).to(dt)
        assert torch.equal(emp_ssl_patches(f64, 3, 8, out_dtype=dt, generator=g()), want)
        crops = ek.random_crops(f64, 3, 8, out_dtype=dt, generator=g())[0]
        assert crops.dtype == dt and crops.shape[-3:] == (3, 8, 8)
    with pytest.raises(ValueError, match=r"emp_ssl_patches: images must be a \[N, C, H, W\] tensor"):
        emp_ssl_patches(u8[0].tolist(), 2, 4)
    with pytest.raises(ValueError, match=r"random_crops: images must be a \[N, C, H, W\] tensor"):
        ek.random_crops(u8[0], 2, 4)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_uint8_to_half_patches_are_rounded_once(dt):
    # The float32 patches rounded to dt: cropping straight to dt rounded before the 1/255 scale
    # too (until 2026-12-06: a quarter of the bf16 values one step off)
    im = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    want = emp_ssl_patches(im, 5, 24, generator=g()).to(dt)
    assert torch.equal(emp_ssl_patches(im, 5, 24, out_dtype=dt, generator=g()), want)
    want = ek.random_crops(im, 5, 24, generator=g())[0].to(dt)
    assert torch.equal(ek.random_crops(im, 5, 24, out_dtype=dt, generator=g())[0], want)


def _tiny_resnet():
    m = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=16)
    m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = torch.nn.Identity()
    return m


def test_many_patch_step_plain_and_block_sparse():
    torch.manual_seed(3)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    patches = emp_ssl_patches(images, 6, 16, generator=torch.Generator().manual_seed(0))
    plain = _tiny_resnet().eval()
    sparse = ek.sparsify(_tiny_resnet().eval())
    sparse.load_state_dict(plain.state_dict())
    loss_plain, _ = emp_ssl_loss(plain(patches), 6, check=True)
    keep_all = torch.ones(patches.shape[0], 4, 4, dtype=torch.bool)
    with ek.block_mask(keep_all, 4):
        loss_sparse, _ = emp_ssl_loss(sparse(patches), 6)
    torch.testing.assert_close(loss_sparse, loss_plain, rtol=1e-5, atol=1e-5)
    # a real mask: the loss changes, and gradients reach the weights and stay finite
    keep = torch.rand(patches.shape[0], 4, 4) < 0.6
    keep[:, 0, 0] = True
    with ek.block_mask(keep, 4):
        loss_masked, _ = emp_ssl_loss(sparse(patches), 6)
    loss_masked.backward()
    assert not torch.allclose(loss_masked, loss_plain)
    assert all(torch.isfinite(p.grad).all() for p in sparse.parameters() if p.grad is not None)
    assert sparse.conv1.weight.grad.abs().sum() > 0


def test_bag_of_features_is_the_patch_mean():
    images = torch.rand(3, 3, 24, 24)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    got = bag_of_features(model, images, 4, 12, generator=torch.Generator().manual_seed(1), chunk=5)
    patches = emp_ssl_patches(images, 4, 12, generator=torch.Generator().manual_seed(1))
    want = model(patches).view(4, 3, 5).mean(0)
    torch.testing.assert_close(got, want)


def test_bag_of_features_chunk_errors():
    model = torch.nn.Flatten()
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="bag_of_features: chunk must be at least 0"):
        bag_of_features(model, images, 2, 4, chunk=-1)
    with pytest.raises(TypeError, match="bag_of_features: chunk must be an int"):
        bag_of_features(model, images, 2, 4, chunk=1.5)
    # images are checked (by emp_ssl_patches) before their shape is read: was an AttributeError
    with pytest.raises(ValueError, match="emp_ssl_patches"):
        bag_of_features(model, [images], 2, 4)


def test_bag_of_features_numpy_chunk():
    # int_arg's converted value is used: Tensor.split refuses a NumPy int (a TypeError until 2026-12-07)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    images = torch.rand(3, 3, 24, 24)
    want = bag_of_features(model, images, 4, 12, generator=torch.Generator().manual_seed(1), chunk=5)
    got = bag_of_features(model, images, 4, 12, generator=torch.Generator().manual_seed(1), chunk=np.int64(5))
    torch.testing.assert_close(got, want)


def test_hflip_p_reaches_the_boxes():
    # images of a horizontal ramp, 16 px square patches: every x step is +1 unflipped, -1 flipped
    images = torch.arange(32.0).expand(4, 3, 32, 32).contiguous()
    for p, step in ((0.0, 1.0), (1.0, -1.0)):
        patches = emp_ssl_patches(images, 10, 16, hflip_p=p, generator=torch.Generator().manual_seed(0))
        assert bool(((patches[..., 1:] - patches[..., :-1]) == step).all())


def test_patches_are_cut_in_eight_launches(monkeypatch):
    # P = 8 and 16: eight equal multi_crop launches, so the peak is the output plus an eighth
    # (the chunk test's P = 20 cannot tell ceil(P / 8) from P // 8 + 1)
    import effssl_kernels.emp_ssl as E

    real = E.multi_crop
    sizes = []

    def counted(images, boxes, *args, **kw):  # boxes [N, views, 4]: views per launch
        sizes.append(boxes.shape[1])
        return real(images, boxes, *args, **kw)

    monkeypatch.setattr(E, "multi_crop", counted)
    images = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)
    for P in (8, 16):
        sizes.clear()
        emp_ssl_patches(images, P, 8, generator=torch.Generator().manual_seed(5))
        assert sizes == [P // 8] * 8


def test_numpy_scalars_are_numbers():
    # eps passed through to tcr_loss as given: np.float32 was refused there ("must be a Python float")
    z = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    want = emp_ssl_loss(z, 4, eps=0.45)[0]
    for eps in (np.float32(0.45), np.float64(0.45)):
        torch.testing.assert_close(emp_ssl_loss(z, 4, eps=eps)[0], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(emp_ssl_loss(z, np.int64(4), lam=np.float32(200.0))[0], emp_ssl_loss(z, 4)[0])


def test_errors():
    with pytest.raises(ValueError, match="not 4 patches"):
        emp_ssl_loss(torch.randn(10, 3), 4)
    with pytest.raises(ValueError, match="patch groups"):
        emp_ssl_loss(torch.randn(3, 2, 3), 4)
    with pytest.raises(ValueError, match="num_patches"):
        emp_ssl_patches(torch.rand(1, 3, 8, 8), 0, 4)
    with pytest.raises(ValueError, match="positive definite"):
        emp_ssl_loss(torch.full((8, 3), float("nan")), 2, normalize=False)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64, got torch.int64"):
        emp_ssl_loss(torch.ones(6, 4, dtype=torch.int64), 2)
    for lam in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="emp_ssl_loss: lam must be finite"):
            emp_ssl_loss(torch.randn(6, 4), 2, lam=lam)
    for lam in ("a", None, True):
        with pytest.raises(TypeError, match="emp_ssl_loss: lam must be a number"):
            emp_ssl_loss(torch.randn(6, 4), 2, lam=lam)
    with pytest.raises(TypeError, match="emp_ssl_loss: eps must be a number"):
        emp_ssl_loss(torch.randn(6, 4), 2, eps="a")
    with pytest.raises(ValueError, match="emp_ssl_loss: eps must be > 0"):
        emp_ssl_loss(torch.randn(6, 4), 2, eps=0.0)
    with pytest.raises(ValueError, match="random_crops: size must be positive"):
        ek.random_crops(torch.rand(1, 3, 8, 8), 2, 0)
    with pytest.raises(TypeError, match="emp_ssl_loss: num_patches must be an int"):
        emp_ssl_loss(torch.randn(6, 4), 2.0)
    with pytest.raises(TypeError, match="emp_ssl_patches: num_patches must be an int"):
        emp_ssl_patches(torch.rand(1, 3, 8, 8), 2.0, 4)
