"""The masked-network references (SEMANTICS.md section 2): the oracle of the block-sparse kernels,
checked against dense PyTorch (all kept), hand computations over kept positions, and gradcheck."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from effssl_kernels.masks import BlockMask
from utils import random_mask
from effssl_kernels.reference.masked_net import (
    masked_avg_pool_reference,
    masked_batch_norm_reference,
    masked_conv2d_reference,
    masked_max_pool2d_reference,
)




def oracle_pixels(mask, s, h, w):
    """Pixel mask by OR-pooling the upsampled input keep map (True off the grid and past the
    image), independent of BlockMask.pixel_mask's integral-image code."""
    keep, B = mask.keep, mask.block_size
    N, Hb, Wb = keep.shape
    full = torch.ones(N, 1, max(Hb * B, h * s), max(Wb * B, w * s))
    full[:, 0, : Hb * B, : Wb * B] = keep.float().repeat_interleave(B, 1).repeat_interleave(B, 2)
    return F.max_pool2d(full[..., : h * s, : w * s], s, s).bool()


def poison_removed(x, m):
    """Same values at kept positions, huge/NaN at removed ones: a masked op must not see them."""
    junk = torch.full_like(x, float("nan"))
    junk[..., ::2, :] = 1e30
    return torch.where(m, x, junk)


# (C_in, C_out, kernel, stride, padding, dilation, groups)
CONVS = [
    (3, 5, 1, 1, 0, 1, 1),
    (3, 5, 1, 2, 0, 1, 1),
    (4, 6, 3, 1, 1, 1, 1),
    (4, 6, 3, 2, 1, 1, 1),
    (3, 4, 7, 2, 3, 1, 1),
    (4, 4, 3, 1, 2, 2, 1),   # dilation
    (4, 6, 3, 1, 1, 1, 2),   # groups
    (6, 6, 3, 2, 1, 1, 6),   # depthwise
    (4, 4, 3, 1, 0, 1, 1),   # no padding: output smaller than input
    (4, 4, 1, 1, 1, 1, 1),   # extra padding: output pixels past the image
]


def conv_params(cin, cout, k, groups, dtype=torch.float32, bias=True):
    w = torch.randn(cout, cin // groups, k, k, dtype=dtype)
    b = torch.randn(cout, dtype=dtype) if bias else None
    return w, b


@pytest.mark.parametrize("cfg", CONVS)
@pytest.mark.parametrize("H,W,B", [(16, 16, 4), (13, 11, 4)])
def test_conv_all_kept_equals_dense(cfg, H, W, B):
    cin, cout, k, s, p, d, g = cfg
    x = torch.randn(2, cin, H, W)
    w, b = conv_params(cin, cout, k, g)
    mask = BlockMask(torch.ones(2, H // B, W // B, dtype=torch.bool), B, (H, W))
    for in_stride in (1, 2):
        got = masked_conv2d_reference(x, w, b, s, p, d, g, mask=mask, in_stride=in_stride)
        assert torch.equal(got, F.conv2d(x, w, b, s, p, d, g))


@pytest.mark.parametrize("cfg", CONVS)
def test_conv_all_removed_zero_output_and_grads(cfg):
    cin, cout, k, s, p, d, g = cfg
    H = W = 16
    x = torch.randn(2, cin, H, W, requires_grad=True)
    w, b = conv_params(cin, cout, k, g)
    w.requires_grad_(True)
    b.requires_grad_(True)
    mask = BlockMask(torch.zeros(2, 4, 4, dtype=torch.bool), 4, (H, W))
    y = masked_conv2d_reference(x, w, b, s, p, d, g, mask=mask)
    ref = F.conv2d(x, w, b, s, p, d, g)
    assert y.shape == ref.shape
    inside = oracle_pixels(mask, s, *y.shape[-2:])       # True only past the image (extra padding)
    assert not y.masked_select(~inside).any()
    (y * torch.randn_like(y)).masked_select(~inside).sum().backward()
    assert not x.grad.any() and not w.grad.any() and not b.grad.any()


@pytest.mark.parametrize("cfg", CONVS)
@pytest.mark.parametrize("H,W,B,in_stride", [(16, 16, 8, 1), (13, 11, 4, 1), (12, 12, 12, 2), (11, 13, 6, 3)])
def test_conv_partial_mask(cfg, H, W, B, in_stride):
    cin, cout, k, s, p, d, g = cfg
    mask = random_mask(3, H * in_stride, W * in_stride, B, seed=H + k)
    x = torch.randn(3, cin, H, W, dtype=torch.float64)
    w, b = conv_params(cin, cout, k, g, torch.float64)
    m_in = oracle_pixels(mask, in_stride, H, W)
    y = masked_conv2d_reference(poison_removed(x, m_in), w, b, s, p, d, g, mask=mask,
                                in_stride=in_stride)
    ref = F.conv2d(x * m_in, w, b, s, p, d, g)
    m_out = oracle_pixels(mask, in_stride * s, *ref.shape[-2:])
    torch.testing.assert_close(y, ref * m_out, rtol=0, atol=0)
    assert torch.isfinite(y).all()
    assert not y.masked_select(~m_out.expand_as(y)).any()       # removed outputs exactly zero


def test_conv_gradients_partial():
    """Gradients equal those of the masked dense formula; zero at removed input positions."""
    mask = random_mask(2, 12, 12, 4, seed=5)
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64, requires_grad=True)
    w, b = conv_params(4, 6, 3, 1, torch.float64)
    w.requires_grad_(True)
    b.requires_grad_(True)
    y = masked_conv2d_reference(x, w, b, 2, 1, mask=mask)
    go = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), go)
    m_in, m_out = oracle_pixels(mask, 1, 12, 12), oracle_pixels(mask, 2, 6, 6)
    ref = F.conv2d(x * m_in, w, b, 2, 1) * m_out
    rx, rw, rb = torch.autograd.grad(ref, (x, w, b), go)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(gb, rb)
    assert not gx.masked_select(~m_in.expand_as(gx)).any()
    assert not bool(mask.keep.all())


@pytest.mark.parametrize("k,s,p,d,g,in_stride", [(3, 1, 1, 1, 1, 1), (3, 2, 1, 1, 1, 2), (1, 2, 0, 1, 1, 1),
                                                 (3, 1, 2, 2, 2, 1), (3, 2, 1, 1, 4, 1)])
def test_conv_gradcheck(k, s, p, d, g, in_stride):
    mask = random_mask(2, 8 * in_stride, 7 * in_stride, 2 * in_stride, seed=k + s)
    x = torch.randn(2, 4, 8, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4 // g, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    def f(x, w, b):
        return masked_conv2d_reference(x, w, b, s, p, d, g, mask=mask, in_stride=in_stride)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_conv_pyramid_waxing():
    """A ResNet stem on 32 px with 8 px blocks: every removed block's footprint is zero at each
    stride, and the final map equals the chain of masked dense formulas."""
    mask = random_mask(2, 32, 32, 8, seed=11)
    x = torch.randn(2, 3, 32, 32)
    w1, w2 = torch.randn(8, 3, 7, 7), torch.randn(8, 8, 3, 3)
    y1 = masked_conv2d_reference(x, w1, None, 2, 3, mask=mask)                    # stride 2
    y2 = masked_max_pool2d_reference(torch.relu(y1), 3, 2, 1, mask=mask, in_stride=2)  # stride 4
    y3 = masked_conv2d_reference(y2, w2, None, 2, 1, mask=mask, in_stride=4)     # stride 8
    for y, s in ((y1, 2), (y2, 4), (y3, 8)):
        f = 8 // s
        foot = mask.keep.repeat_interleave(f, 1).repeat_interleave(f, 2).unsqueeze(1)
        assert y.shape[-1] == 32 // s
        assert not y.masked_select(~foot.expand_as(y)).any()
    r1 = F.conv2d(x * oracle_pixels(mask, 1, 32, 32), w1, None, 2, 3) * oracle_pixels(mask, 2, 16, 16)
    r2 = F.max_pool2d(torch.relu(r1), 3, 2, 1) * oracle_pixels(mask, 4, 8, 8)
    r3 = F.conv2d(r2, w2, None, 2, 1) * oracle_pixels(mask, 8, 4, 4)
    torch.testing.assert_close(y3, r3)


# ---- BatchNorm ----------------------------------------------------------------------------------
def bn_over_kept(x, m, rm, rv, w, b, momentum, eps):
    """Oracle: F.batch_norm on the kept positions gathered into [1, C, n, 1], scattered back."""
    C = x.shape[1]
    idx = m.expand_as(x)
    kept = x.transpose(0, 1).masked_select(idx.transpose(0, 1)).view(C, -1)
    yk = F.batch_norm(kept.t().reshape(-1, C), rm, rv, w, b, True, momentum, eps)
    out = torch.zeros_like(x)
    return out.transpose(0, 1).masked_scatter(idx.transpose(0, 1), yk.t().contiguous()).transpose(0, 1)


@pytest.mark.parametrize("affine", [True, False])
def test_bn_all_kept_equals_batchnorm(affine):
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(5, affine=affine, momentum=0.3).double()
    if affine:
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    m = torch.ones(3, 1, 6, 7, dtype=torch.bool)
    for step in range(3):
        x = torch.randn(3, 5, 6, 7, dtype=torch.float64) * 2 + step
        bn.train()
        ref = bn(x)
        got = masked_batch_norm_reference(x, m, rm, rv, bn.weight, bn.bias, True, 0.3, bn.eps)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(rm, bn.running_mean)
        torch.testing.assert_close(rv, bn.running_var)
    bn.eval()
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(masked_batch_norm_reference(x, m, rm, rv, bn.weight, bn.bias, False, 0.3, bn.eps),
                               bn(x))


def test_bn_cumulative_average_factor_matches_momentum_none():
    """nn.BatchNorm2d(momentum=None) is reproduced by passing 1 / num_batches_tracked."""
    bn = nn.BatchNorm2d(3, momentum=None).double().train()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    m = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    for step in range(1, 4):
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64) + step
        ref = bn(x)
        got = masked_batch_norm_reference(x, m, rm, rv, bn.weight, bn.bias, True, 1.0 / step, bn.eps)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(rm, bn.running_mean)
        torch.testing.assert_close(rv, bn.running_var)
    with pytest.raises(ValueError, match="momentum=None"):
        masked_batch_norm_reference(x, m, rm, rv, None, None, True, None, 1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_bn_partial_mask_train(seed):
    mask = random_mask(3, 12, 10, 4, p=0.5, seed=seed)
    m = oracle_pixels(mask, 2, 6, 5)
    C = 4
    x = (torch.randn(3, C, 6, 5, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    w = torch.randn(C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    rm2, rv2 = rm.clone(), rv.clone()
    got = masked_batch_norm_reference(poison_removed(x, m), m, rm, rv, w, b, True, 0.2, 1e-5)
    ref = bn_over_kept(x, m, rm2, rv2, w, b, 0.2, 1e-5)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
    # By hand: statistics over the n kept positions, unbiased variance in the running update.
    n = int(m.sum())
    kept = x.detach().transpose(0, 1)[m.expand_as(x).transpose(0, 1)].view(C, n)
    mean, var = kept.mean(1), kept.var(1, unbiased=False)
    torch.testing.assert_close(rm, 0.8 * rm0 + 0.2 * mean)
    torch.testing.assert_close(rv, 0.8 * rv0 + 0.2 * kept.var(1, unbiased=True))
    col = lambda v: v.detach().view(1, C, 1, 1)  # noqa: E731
    hand = (x.detach() - col(mean)) / torch.sqrt(col(var) + 1e-5) * col(w) + col(b)
    torch.testing.assert_close(got.detach(), hand * m)
    go = torch.randn_like(got)
    g = torch.autograd.grad(got, (x, w, b), go)
    r = torch.autograd.grad(ref, (x, w, b), go)
    for a, e in zip(g, r, strict=True):
        torch.testing.assert_close(a, e)
    assert not g[0].masked_select(~m.expand_as(x)).any()
    assert 1 < n < m.numel()


def test_bn_running_update_by_hand():
    mask = random_mask(2, 8, 8, 2, seed=3)
    m = mask.pixel_mask(1, (8, 8))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    masked_batch_norm_reference(x, m, rm, rv, None, None, True, 0.1, 1e-5)
    kept = x.transpose(0, 1)[m.expand_as(x).transpose(0, 1)].view(3, -1)
    torch.testing.assert_close(rm, 0.1 * kept.mean(1))
    torch.testing.assert_close(rv, 0.9 + 0.1 * kept.var(1, unbiased=True))


@pytest.mark.parametrize("n_kept", [0, 1])
def test_bn_no_update_when_n_le_1(n_kept):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    m = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    if n_kept:
        m[1, 0, 2, 3] = True
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.1
    rm0, rv0 = rm.clone(), rv.clone()
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    y = masked_batch_norm_reference(x, m, rm, rv, w, b, True, 0.1, 1e-5)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert torch.isfinite(y).all()
    assert not y.masked_select(~m.expand_as(y)).any()
    if n_kept:   # the one kept value is its own mean: output = bias there
        torch.testing.assert_close(y[1, :, 2, 3], b)
    (gx,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x)
    assert torch.isfinite(gx).all()


def test_bn_eval_partial_and_no_running_stats():
    m = random_mask(2, 8, 8, 4, seed=2).pixel_mask(1, (8, 8))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    got = masked_batch_norm_reference(poison_removed(x, m), m, rm, rv, w, b, False, 0.1, 1e-5)
    torch.testing.assert_close(got, F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5) * m)
    # track_running_stats=False: batch statistics, nothing to update.
    got = masked_batch_norm_reference(x, m, None, None, w, b, True, 0.1, 1e-5)
    torch.testing.assert_close(got, bn_over_kept(x, m, None, None, w, b, 0.1, 1e-5))


def test_bn_gradcheck():
    m = random_mask(2, 6, 6, 2, seed=4).pixel_mask(1, (6, 6))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    def f(x, w, b):
        return masked_batch_norm_reference(x, m, None, None, w, b, True, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bn_low_precision(dtype):
    m = random_mask(2, 8, 8, 4, seed=6).pixel_mask(1, (8, 8))
    x = torch.randn(2, 3, 8, 8) * 2 + 1
    rm, rv = torch.zeros(3), torch.ones(3)
    rm32, rv32 = rm.clone(), rv.clone()
    y = masked_batch_norm_reference(x.to(dtype), m, rm, rv, torch.ones(3), torch.zeros(3), True, 0.1, 1e-5)
    y32 = masked_batch_norm_reference(x.to(dtype).float(), m, rm32, rv32, torch.ones(3), torch.zeros(3),
                                      True, 0.1, 1e-5)
    assert y.dtype == dtype and rm.dtype == torch.float32
    torch.testing.assert_close(y.float(), y32, rtol=0, atol=0.02)
    torch.testing.assert_close(rm, rm32)
    torch.testing.assert_close(rv, rv32)


# ---- pooling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,s,p,ceil", [(3, 2, 1, False), (2, 2, 0, False), (3, 1, 1, False), (3, 2, 0, True)])
@pytest.mark.parametrize("H,W,B", [(16, 16, 4), (13, 11, 4)])
def test_max_pool(k, s, p, ceil, H, W, B):
    x = torch.randn(2, 3, H, W, dtype=torch.float64) - 0.5
    ones = BlockMask(torch.ones(2, H // B, W // B, dtype=torch.bool), B, (H, W))
    assert torch.equal(masked_max_pool2d_reference(x, k, s, p, ceil_mode=ceil, mask=ones),
                       F.max_pool2d(x, k, s, p, ceil_mode=ceil))
    mask = random_mask(2, 2 * H, 2 * W, 2 * B, seed=H + k)
    m_in = oracle_pixels(mask, 2, H, W)
    xr = x.clone().requires_grad_(True)
    y = masked_max_pool2d_reference(poison_removed(xr, m_in), k, s, p, ceil_mode=ceil, mask=mask, in_stride=2)
    ref = F.max_pool2d(x * m_in, k, s, p, ceil_mode=ceil)
    m_out = oracle_pixels(mask, 2 * s, *ref.shape[-2:])
    torch.testing.assert_close(y, ref * m_out, rtol=0, atol=0)
    (gx,) = torch.autograd.grad(y.sum(), xr)
    assert not gx.masked_select(~m_in.expand_as(gx)).any()
    zeros = BlockMask(torch.zeros(2, H // B, W // B, dtype=torch.bool), B, (H, W))
    y0 = masked_max_pool2d_reference(x, k, s, p, ceil_mode=ceil, mask=zeros)
    assert not y0.masked_select(~oracle_pixels(zeros, s, *y0.shape[-2:]).expand_as(y0)).any()


@pytest.mark.parametrize("H,W", [(1, 1), (2, 3), (5, 4)])
def test_max_pool_padding_explicit(H, W):
    """The -inf padding is explicit, so a window wholly in the padding (k 2, dilation 2, padding
    1 on a 1-pixel side) gives -inf and no gradient; torch 2.14's own CPU max_pool2d returns an
    index outside the input there and its backward writes out of bounds (until 2026-12-06 the
    reference, and sparsified models' masked-dense pool, went through it). Elsewhere it equals
    F.max_pool2d, ceil_mode's output size included."""
    ones = BlockMask(torch.ones(1, H, W, dtype=torch.bool), 1, (H, W))
    for k, s, p, d, ceil in [(2, 1, 1, 2, False), (2, 1, 1, 2, True), (3, 2, 1, 1, True), (2, 3, 1, 1, True),
                             (3, 3, 1, 2, False), (1, 2, 0, 1, True)]:
        x = torch.randn(1, 2, H, W, dtype=torch.float64, requires_grad=True)
        try:
            ref = F.max_pool2d(x.detach(), k, s, p, d, ceil)
        except RuntimeError as e:  # a window larger than the padded input: refused alike
            with pytest.raises(RuntimeError, match="too small"):
                masked_max_pool2d_reference(x, k, s, p, d, ceil, mask=ones)
            assert "too small" in str(e)
            continue
        y = masked_max_pool2d_reference(x, k, s, p, d, ceil, mask=ones)
        assert y.shape == ref.shape
        assert torch.equal(torch.isinf(y), torch.isinf(ref))
        assert torch.equal(y[torch.isfinite(y)], ref[torch.isfinite(ref)])
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        fin = torch.isfinite(y)
        with torch.no_grad():  # each finite output routes its 1 to one input: the grads count them
            assert gx.sum().item() == fin.sum().item() and (gx >= 0).all()
    x = torch.randn(1, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    y = masked_max_pool2d_reference(x, 2, 1, 1, 2, mask=BlockMask(torch.ones(1, 1, 1, dtype=torch.bool), 1, (1, 1)))
    assert y.shape == (1, 1, 1, 1) and y.item() == float("-inf")
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert gx.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_max_pool_padding_explicit_integers(dtype):
    # the explicit padding is the dtype's lowest value, as F.max_pool2d's (-inf cannot be an int)
    ones = BlockMask(torch.ones(1, 2, 2, dtype=torch.bool), 2, (4, 4))
    x = torch.randint(0, 100, (1, 2, 4, 4)).to(dtype)
    assert torch.equal(masked_max_pool2d_reference(x, 3, 2, 1, mask=ones), F.max_pool2d(x, 3, 2, 1))


def test_max_pool_removed_read_as_zero_and_default_stride():
    """All-negative input: a kept output window that touches a removed pixel gives 0, not the
    kept maximum; stride=None means kernel_size."""
    keep = torch.tensor([[[True, False]]])
    mask = BlockMask(keep, 2, (2, 4))
    x = -torch.arange(1.0, 9.0).view(1, 1, 2, 4)
    y = masked_max_pool2d_reference(x, 3, 1, 1, mask=mask)
    assert y[0, 0, :, :2].tolist() == [[-1.0, 0.0], [-1.0, 0.0]]
    assert not y[0, 0, :, 2:].any()
    y = masked_max_pool2d_reference(x, 2, mask=mask)
    assert y.shape == (1, 1, 1, 2) and y[0, 0].tolist() == [[-1.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_avg_pool(dtype):
    x = torch.randn(3, 4, 6, 5, dtype=dtype)
    ones = torch.ones(3, 1, 6, 5, dtype=torch.bool)
    tol = {"rtol": 0.01, "atol": 0.01} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(masked_avg_pool_reference(x, ones), x.float().mean((2, 3)).to(dtype), **tol)
    m = random_mask(3, 12, 10, 4, seed=9).pixel_mask(2, (6, 5)).clone()
    m[2] = False                                  # a sample with nothing kept
    y = masked_avg_pool_reference(poison_removed(x, m), m)
    assert y.shape == (3, 4) and y.dtype == dtype
    for n in range(2):
        sel = x[n].float()[m[n].expand(4, 6, 5)].view(4, -1)
        assert sel.shape[1] > 0
        torch.testing.assert_close(y[n].float(), sel.mean(1), **tol)
    assert torch.equal(y[2], torch.zeros(4, dtype=dtype))


def test_avg_pool_gradients():
    m = random_mask(2, 6, 6, 2, seed=1).pixel_mask(1, (6, 6)).clone()
    m[1] = False
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: masked_avg_pool_reference(x, m), (x,))
    (gx,) = torch.autograd.grad(masked_avg_pool_reference(x, m).sum(), x)
    assert torch.isfinite(gx).all() and not gx[1].any()
    n0 = int(m[0].sum())
    torch.testing.assert_close(gx[0], m[0].expand(3, 6, 6).double() / n0)


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_conv_and_pool():
    mask = random_mask(2, 8, 8, 4)
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(TypeError, match="BlockMask"):
        masked_conv2d_reference(x, w, mask=mask.keep)
    with pytest.raises(ValueError, match="batch"):
        masked_conv2d_reference(torch.randn(3, 3, 8, 8), w, mask=mask)
    with pytest.raises(ValueError, match="4-D"):
        masked_conv2d_reference(torch.randn(3, 8, 8), w, mask=mask)
    meta = BlockMask(torch.ones(2, 2, 2, dtype=torch.bool, device="meta"), 4, 8)
    with pytest.raises(ValueError, match="mask is on meta"):
        masked_conv2d_reference(x, w, mask=meta)
    with pytest.raises(ValueError, match="mask is on meta"):
        masked_max_pool2d_reference(x, 2, mask=meta)
    with pytest.raises(ValueError, match="in_stride must be positive"):
        masked_conv2d_reference(x, w, mask=mask, in_stride=0)
    with pytest.raises(ValueError, match="batch"):
        masked_max_pool2d_reference(x[:1], 2, mask=mask)


def test_bad_inputs_bn_and_avg():
    x = torch.randn(2, 3, 4, 4)
    m = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match="bool"):
        masked_batch_norm_reference(x, m.float(), rm, rv, None, None, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="shape"):
        masked_batch_norm_reference(x, m[:, :, :3], rm, rv, None, None, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="shape"):
        masked_batch_norm_reference(x, m.squeeze(1), rm, rv, None, None, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="on meta"):
        masked_batch_norm_reference(x, m.to("meta"), rm, rv, None, None, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="eval mode"):
        masked_batch_norm_reference(x, m, None, None, None, None, False, 0.1, 1e-5)
    with pytest.raises(ValueError, match="both"):
        masked_batch_norm_reference(x, m, rm, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"running_mean must have shape \[3\]"):
        masked_batch_norm_reference(x, m, torch.zeros(4), rv, None, None, True, 0.1, 1e-5)
    with pytest.raises(TypeError, match="bool"):
        masked_avg_pool_reference(x, m.int())
    with pytest.raises(ValueError, match="shape"):
        masked_avg_pool_reference(x, m[:1])
    with pytest.raises(ValueError, match="4-D"):
        masked_avg_pool_reference(x[0], m[0])


@pytest.mark.parametrize("training", [True, False])
def test_bn_uses_its_eps(training):
    """eps other than BatchNorm2d's default (1e-3 models, or a large one that shows): every test
    above uses 1e-5, which a hard-coded eps would pass."""
    from effssl_kernels.sparse.masked_dense import masked_batch_norm

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, eps=0.5).double().train(training)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    m = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    for fn in (masked_batch_norm_reference, masked_batch_norm):
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()
        got = fn(x, m, rm, rv, bn.weight, bn.bias, training, 0.1, bn.eps)
        torch.testing.assert_close(got, F.batch_norm(x, bn.running_mean.clone(), bn.running_var.clone(), bn.weight,
                                                     bn.bias, training, 0.1, bn.eps))
