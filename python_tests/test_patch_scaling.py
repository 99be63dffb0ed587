"""Patch scaling (FlexiViT PI-resize, pos-embed interpolation, ek.patch_size on a timm ViT)."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import effssl_kernels as ek
from effssl_kernels.patch_scaling import clear_resize_cache, resize_matrix_pinv

timm = pytest.importorskip("timm")

MODES = [("bilinear", False), ("bicubic", True), ("bicubic", False), ("bilinear", True)]


def _resize(x, size, mode, aa):
    return F.interpolate(x, size=size, mode=mode, antialias=aa, align_corners=False)


@pytest.mark.parametrize("new", [24, 30, 32, 40, (20, 28)])
@pytest.mark.parametrize("mode,aa", MODES)
def test_inner_product_identity(new, mode, aa):
    """SEMANTICS.md: for a patch x and a larger size, <x, w> == <resize(x), PI-resize(w)> (float64)."""
    g = torch.Generator().manual_seed(0)
    D, C, p = 5, 3, 16
    w = torch.randn(D, C, p, p, dtype=torch.float64, generator=g)
    x = torch.rand(7, C, p, p, dtype=torch.float64, generator=g)
    w2 = ek.resize_patch_embed(w, new, interpolation=mode, antialias=aa)
    size = (new, new) if isinstance(new, int) else new
    assert w2.shape == (D, C, *size) and w2.dtype == torch.float64
    lhs = torch.einsum("nchw,dchw->nd", x, w)
    rhs = torch.einsum("nchw,dchw->nd", _resize(x, size, mode, aa), w2)
    torch.testing.assert_close(rhs, lhs, rtol=1e-9, atol=1e-9)


def test_inner_product_identity_fails_for_plain_resize():
    """The identity is a property of the pseudo-inverse: resizing w like an image breaks it."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=g)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=g)
    naive = _resize(w, (24, 24), "bilinear", False) * (16 / 24) ** 2
    lhs = torch.einsum("nchw,dchw->nd", x, w)
    rhs = torch.einsum("nchw,dchw->nd", _resize(x, (24, 24), "bilinear", False), naive)
    assert (rhs - lhs).abs().max() > 1e-3


@pytest.mark.parametrize("new", [24, 40])
def test_tokens_of_patchwise_upsampled_image(new):
    """Patch embedding of an image whose patches were each upsampled to p' with the PI-resized
    kernel (conv, stride p') equals the original embedding at p: the same tokens, in layout."""
    g = torch.Generator().manual_seed(2)
    D, C, p, gh, gw = 6, 3, 16, 3, 2
    w = torch.randn(D, C, p, p, dtype=torch.float64, generator=g)
    b = torch.randn(D, dtype=torch.float64, generator=g)
    img = torch.rand(2, C, gh * p, gw * p, dtype=torch.float64, generator=g)
    patches = img.reshape(2, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, p, p)
    up = _resize(patches, (new, new), "bilinear", False)
    img_up = up.reshape(2, gh, gw, C, new, new).permute(0, 3, 1, 4, 2, 5).reshape(2, C, gh * new, gw * new)
    tok = F.conv2d(img, w, b, stride=p)
    tok_up = F.conv2d(img_up, ek.resize_patch_embed(w, new), b, stride=new)
    torch.testing.assert_close(tok_up, tok, rtol=1e-9, atol=1e-9)


def test_smaller_size_is_least_squares():
    """For p' < p the PI-resize is the minimum-norm least-squares solution of <R x, w'> = <x, w>."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=g)
    w2 = ek.resize_patch_embed(w, 4)
    R = _resize(torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8), (4, 4), "bilinear", False).reshape(64, 16).T
    sol = torch.linalg.lstsq(R.T, w.reshape(2, 64).T, driver="gelsd").solution.T  # min ||R^T w' - w||
    torch.testing.assert_close(w2.reshape(2, 16), sol, rtol=1e-8, atol=1e-8)


def test_same_size_and_dtypes():
    w = torch.randn(4, 3, 16, 16)
    assert ek.resize_patch_embed(w, 16) is w
    assert ek.resize_patch_embed(w, (16, 16)) is w
    wb = w.to(torch.bfloat16)
    out = ek.resize_patch_embed(wb, 24)
    assert out.dtype == torch.bfloat16
    ref = ek.resize_patch_embed(w, 24)
    torch.testing.assert_close(out.float(), ek.resize_patch_embed(wb.float(), 24).to(torch.bfloat16).float())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the matmul must not run in bf16
        under = ek.resize_patch_embed(w, 24)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, ref, rtol=1e-6, atol=1e-6)


def test_matches_timm_resample_patch_embed():
    from timm.layers import resample_patch_embed

    w = torch.randn(8, 3, 16, 16)
    for size in (24, 8):
        ours = ek.resize_patch_embed(w, size, interpolation="bicubic", antialias=True)
        torch.testing.assert_close(ours, resample_patch_embed(w, [size, size]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("old,new", [((4, 4), (5, 2)), ((4, 4), (6, 2)), ((4, 4), (6, 3)), ((8, 4), (4, 8)),
                                     ((16, 16), (24, 8)), ((4, 4), (8, 8)), ((8, 8), (4, 4))])
@pytest.mark.parametrize("mode,aa", MODES)
def test_pinv_is_the_moore_penrose_inverse(old, new, mode, aa):
    # Mixed up/down resizes can be rank-deficient: the normal-equation shortcut then found a
    # generalised inverse that is not the minimum-norm one (4x4 -> 5x2: 1.47 off), unseen by the
    # two Penrose conditions it checked.
    from effssl_kernels.patch_scaling import _pinv, _resize_matrix

    R = _resize_matrix(old, new, mode, aa)
    torch.testing.assert_close(_pinv(R), torch.linalg.pinv(R), rtol=0, atol=1e-9)


def test_mixed_resize_matches_timm():
    from timm.layers import resample_patch_embed

    clear_resize_cache()
    w = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    for size in ([5, 2], [6, 2], [2, 6]):
        want = resample_patch_embed(w, size, interpolation="bilinear", antialias=False)
        torch.testing.assert_close(ek.resize_patch_embed(w, tuple(size)), want, rtol=1e-4, atol=1e-4)  # timm: float32


def test_resize_patch_embed_gradcheck():
    w = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ek.resize_patch_embed(t, 6), (w,))
    assert torch.autograd.gradcheck(lambda t: ek.resize_patch_embed(t, 3, interpolation="bicubic"), (w,))


def test_pinv_cache():
    clear_resize_cache()
    a = resize_matrix_pinv(16, 24)
    assert resize_matrix_pinv((16, 16), (24, 24)) is a
    assert a.shape == (256, 576) and a.dtype == torch.float32
    assert resize_matrix_pinv(16, 24, dtype=torch.float64) is not a
    assert resize_matrix_pinv(16, 24, interpolation="bicubic") is not a
    clear_resize_cache()
    assert resize_matrix_pinv(16, 24) is not a


def test_pinv_cache_filled_under_inference_mode():
    # evaluating at another patch size first must not leave inference tensors in the cache,
    # which training at that size would then fail to save for backward
    clear_resize_cache()
    w = torch.randn(2, 3, 16, 16, requires_grad=True)
    with torch.inference_mode():
        ek.resize_patch_embed(w.detach(), 24)
    assert not resize_matrix_pinv(16, 24).is_inference()
    ek.resize_patch_embed(w, 24).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call,exc",
    [
        (lambda: ek.resize_patch_embed(torch.randn(4, 3, 16), 24), ValueError),
        (lambda: ek.resize_patch_embed(torch.zeros(4, 3, 16, 16, dtype=torch.long), 24), TypeError),
        (lambda: ek.resize_patch_embed(torch.randn(4, 3, 16, 16), 0), ValueError),
        (lambda: ek.resize_patch_embed(torch.randn(4, 3, 16, 16), 2.5), TypeError),
        (lambda: ek.resize_patch_embed(torch.randn(4, 3, 16, 16), (1, 2, 3)), TypeError),
        (lambda: ek.resize_patch_embed(torch.randn(4, 3, 16, 16), 24, interpolation="lanczos"), ValueError),
        (lambda: ek.resize_patch_embed([1.0], 24), TypeError),
    ],
)
def test_resize_patch_embed_errors(call, exc):
    with pytest.raises(exc):
        call()


# ----------------------------------------------------------------------------- resize_pos_embed
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("old,new", [((15, 15), (10, 10)), ((4, 4), (6, 6)), ((4, 6), (3, 5))])
def test_resize_pos_embed_matches_timm(prefix, old, new):
    from timm.layers import resample_abs_pos_embed

    pe = torch.randn(1, prefix + old[0] * old[1], 32)
    ours = ek.resize_pos_embed(pe, old, new, num_prefix_tokens=prefix)
    ref = resample_abs_pos_embed(pe, list(new), list(old), num_prefix_tokens=prefix)
    assert ours.shape == (1, prefix + new[0] * new[1], 32)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert torch.equal(ours[:, :prefix], pe[:, :prefix])  # prefix tokens untouched
    two_d = ek.resize_pos_embed(pe[0], old, new, num_prefix_tokens=prefix)
    assert torch.equal(two_d, ours[0])
    for dtype in (torch.bfloat16, torch.float16):  # interpolated in float32, as timm, then rounded
        half = pe.to(dtype)
        got = ek.resize_pos_embed(half, old, new, num_prefix_tokens=prefix)
        want = resample_abs_pos_embed(half, list(new), list(old), num_prefix_tokens=prefix)
        assert got.dtype == dtype and torch.equal(got, want)


def test_resize_pos_embed_identity_and_grad():
    pe = torch.randn(1, 17, 8, dtype=torch.float64, requires_grad=True)
    assert ek.resize_pos_embed(pe, 4, 4, 1) is pe
    assert torch.autograd.gradcheck(lambda t: ek.resize_pos_embed(t, 4, (3, 5), 1), (pe,))
    with pytest.raises(ValueError, match="entries"):
        ek.resize_pos_embed(pe, 4, 3, 0)
    with pytest.raises(ValueError):
        ek.resize_pos_embed(torch.randn(2, 16, 8), 4, 3)
    with pytest.raises(ValueError):
        ek.resize_pos_embed(pe, 4, 3, -1)
    with pytest.raises(TypeError):
        ek.resize_pos_embed(torch.zeros(1, 16, 8, dtype=torch.long), 4, 3)


# ----------------------------------------------------------------------------- ek.patch_size on a ViT
def _vit(**kw):
    kw = {"img_size": 240, "depth": 1, "embed_dim": 48, "num_heads": 2, **kw}
    return timm.create_model("vit_small_patch16_224", num_classes=0, **kw).eval()


def _manual(model, x, p, keep=None):
    """timm's blocks on [prefix + pos, gather(patch_embed_p(x) + pos_p)] built by hand."""
    W = ek.resize_patch_embed(model.patch_embed.proj.weight, p)
    t = F.conv2d(x, W, model.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    grid = x.shape[-1] // p
    pos = model.pos_embed
    npre = model.num_prefix_tokens
    pos_pre, pos_patch = pos[:, :npre], pos[:, npre:]
    t = t + ek.resize_pos_embed(pos_patch, model.patch_embed.grid_size, (grid, grid))
    if keep is not None:
        t = t.gather(1, keep[..., None].expand(-1, -1, t.shape[-1]))
    prefix = model.cls_token.expand(x.shape[0], -1, -1) + pos_pre
    tokens = torch.cat((prefix, t), 1)
    return model.forward_head(model.norm(model.blocks(model.norm_pre(tokens))))


@pytest.mark.parametrize("p", [16, 24, 30, 40])
def test_vit_patch_size_240(p):
    model = ek.sparsify_vit(_vit())
    params = {n: (t, t.data_ptr()) for n, t in model.named_parameters()}
    x = torch.rand(2, 3, 240, 240)
    L = (240 // p) ** 2
    keep = ek.random_token_keep(2, L, 0.5, multiple_of=1, generator=torch.Generator().manual_seed(p))
    with ek.patch_size(model, p):
        out = model(x)
        with ek.token_keep(keep):
            out_keep = model(x)
            feats = model.forward_features(x)
    assert feats.shape == (2, 1 + keep.shape[1], 48)
    torch.testing.assert_close(out, _manual(model, x, p), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_keep, _manual(model, x, p, keep), rtol=1e-5, atol=1e-5)
    # gradients reach the original parameters, which kept their identity
    out_keep.square().sum().backward()
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token"):
        t = dict(model.named_parameters())[name]
        assert t is params[name][0] and t.data_ptr() == params[name][1]
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    assert model.patch_embed.proj.weight.shape == (48, 3, 16, 16)


def test_vit_patch_size_grad_matches_manual():
    torch.manual_seed(0)
    model = ek.sparsify_vit(_vit(no_embed_class=False))
    x = torch.rand(2, 3, 240, 240)
    with ek.patch_size(model, 24):
        model(x).sum().backward()
    got = {n: t.grad.clone() for n, t in model.named_parameters()}
    model.zero_grad()
    _manual(model, x, 24).sum().backward()
    for n, t in model.named_parameters():
        torch.testing.assert_close(got[n], t.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_vit_patch_size_native_and_restore():
    model = _vit()
    x = torch.rand(1, 3, 240, 240)
    ref = model(x)
    ek.sparsify_vit(model)
    with ek.patch_size(model, 16):
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)
    with ek.patch_size(model, 30):
        with ek.patch_size(model, 40):
            y40 = model(x)
        y30 = model(x)
    assert not torch.allclose(y40, y30)
    torch.testing.assert_close(y30, _manual(model, x, 30), rtol=1e-5, atol=1e-5)
    assert torch.equal(model(x), ref)  # restored: the untouched model


def test_vit_copy_made_inside_patch_size_is_the_plain_model():
    # a teacher copied (or a checkpoint saved) inside the with does not keep the with's setting
    model = ek.sparsify_vit(_vit())
    x = torch.rand(1, 3, 240, 240)
    ref = model(x)
    with ek.patch_size(model, 30):
        teacher = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        assert torch.equal(teacher(x), ref)  # the copy is at the model's own patch size
        with ek.patch_size(teacher, 30):
            torch.testing.assert_close(teacher(x), model(x))
    assert torch.equal(teacher(x), ref)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), ref)


def test_vit_patchwise_upsampled_image_same_output():
    """A model at patch 16 on an image equals the same model at patch 24 on the image with every
    patch upsampled to 24 (float64, dynamic image size so both grids are 4x4)."""
    model = timm.create_model(
        "vit_small_patch16_224", img_size=64, depth=1, embed_dim=32, num_heads=2, num_classes=0, dynamic_img_size=True
    ).double().eval()
    ek.sparsify_vit(model)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    patches = x.reshape(2, 3, 4, 16, 4, 16).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 16, 16)
    up = _resize(patches, (24, 24), "bilinear", False)
    x_up = up.reshape(2, 4, 4, 3, 24, 24).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 96, 96)
    ref = model(x)
    with ek.patch_size(model, 24):
        out = model(x_up)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_vit_patch_size_errors():
    model = _vit()
    with pytest.raises(TypeError, match="sparsify_vit"):
        with ek.patch_size(model, 24):
            pass
    ek.sparsify_vit(model)
    for bad, exc in ((36, ValueError), (0, ValueError), ((24,), TypeError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="patch_size"):
            with ek.patch_size(model, bad):
                pass
    with ek.patch_size(model, 24):
        with pytest.raises(ValueError, match="input size"):
            model(torch.rand(1, 3, 224, 224))
