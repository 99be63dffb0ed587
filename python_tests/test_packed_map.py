"""PackedMap (maps kept packed between the layers of a sparsified ResNet) against the dense
masked maps it stands for, and the packed layer functions against the section 2 references."""
import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effssl_kernels.masks import BlockMask
from effssl_kernels.nn import resnet as R
from effssl_kernels.reference.masked_net import (
    masked_avg_pool_reference,
    masked_batch_norm_reference,
    masked_conv2d_reference,
    masked_max_pool2d_reference,
)
from effssl_kernels.sparse import packed as P
from effssl_kernels.sparse.packed import PackedMap, as_dense, pack_map
from effssl_kernels.sparse.tiles import TileIndex

from utils import random_mask

# torch 2.6 cannot say which saved-tensors hooks are in force, so to_dense's cache is off there
# (every read unpacks: never a stale copy under a checkpoint, one more unpack per shared read)
CACHES = P._saved_tensors_hooks() is not P._UNKNOWN


def _packed(seed=0, n=2, c=3, hw=32, block=8, stride=2, dtype=torch.float64):
    mask = random_mask(n, hw, hw, block, p=0.5, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw // stride, hw // stride, generator=g, dtype=dtype)
    x = x * mask.pixel_mask(stride, x.shape[-2:])  # the dense masked map
    return x.requires_grad_(True), mask, pack_map(x, mask, (stride, stride))


def test_metadata_is_dense_data_is_tiles():
    x, mask, p = _packed()
    assert isinstance(p, PackedMap)
    assert p.shape == x.shape and p.size() == x.shape and p.size(1) == 3 and p.dim() == 4
    assert p.numel() == x.numel() and p.dtype == x.dtype and p.device == x.device
    assert p.requires_grad and p.tiles.shape == (p.index.num_tiles, 3, 4, 4)
    assert type(p.tiles) is torch.Tensor
    assert torch.equal(p.to_dense(), x)
    assert "PackedMap" in repr(p)


def test_elementwise_ops_stay_packed_and_match_dense():
    x, mask, p = _packed(seed=1)
    scale = torch.rand(1, 3, 1, 1, dtype=x.dtype) + 0.5

    def f(t):
        y = F.relu(t) + t * 2
        y = y * scale - 0.5 * t  # a per-channel tensor and scalars broadcast alike
        y += t
        return torch.relu_(y)

    got = f(p)
    assert isinstance(got, PackedMap) and got.index is p.index
    want = f(x)
    torch.testing.assert_close(got.to_dense(), want)
    g = torch.randn_like(want)
    gp, = torch.autograd.grad(got.to_dense(), x, g)
    gd, = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gp, gd)


@pytest.mark.parametrize("module", [torch.nn.SELU(inplace=True), torch.nn.CELU(0.7, inplace=True),
                                    torch.nn.Softsign(), torch.nn.Tanhshrink(), torch.nn.Softshrink(0.3),
                                    torch.nn.Hardshrink(0.3), torch.nn.ELU(inplace=True)], ids=repr)
def test_zero_preserving_activations_stay_packed(module):
    # activations with f(0) = 0 run on the tiles (in place too: nn.SELU(inplace=True) raised)
    x, mask, p = _packed(seed=2)
    got = module(p * 1.0)  # a fresh map: in-place modules change their input
    assert isinstance(got, PackedMap)
    want = module(x * 1.0)
    torch.testing.assert_close(got.to_dense(), want)
    g = torch.randn_like(want)
    kept = mask.pixel_mask(2, x.shape[-2:]).expand_as(x)  # removed positions get no gradient (f'(0) may be 1)
    torch.testing.assert_close(torch.autograd.grad(got.to_dense(), x, g)[0], torch.autograd.grad(want, x, g)[0] * kept)


def test_other_ops_see_the_dense_map(monkeypatch):
    monkeypatch.setattr(P, "_WARNED", set())  # warned once per op name and process
    x, mask, p = _packed(seed=2)
    row = torch.randn(x.shape[-1], dtype=x.dtype)  # broadcasts along W, not per channel
    with pytest.warns(UserWarning, match="dense map") as rec:
        y = p + row
    assert not any("exact" in str(w.message) for w in rec)  # not for every op (layers, reductions)
    assert type(y) is torch.Tensor
    torch.testing.assert_close(y, x + row)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(p.sum(dim=(2, 3)), x.sum(dim=(2, 3)))
        torch.testing.assert_close(torch.flatten(p, 1), torch.flatten(x, 1))
        torch.testing.assert_close(p[1, :, 3], x[1, :, 3])


def test_maps_of_different_resolutions_combine_densely():
    x, mask, p = _packed(seed=3)
    q = pack_map(x, mask, (2, 2))
    assert q.index is p.index  # one TileIndex per mask and stride
    other = random_mask(2, 32, 32, 8, p=0.5, seed=9)
    r = pack_map(x * other.pixel_mask(2, x.shape[-2:]), other, (2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = p + r
    assert type(y) is torch.Tensor
    torch.testing.assert_close(y, x + r.to_dense())


def test_maps_of_equal_masks_combine_on_the_tiles():
    # An equal but new mask (a checkpoint recomputed under the `with` of an equal keep) indexes
    # the same tiles: its maps combine with the first mask's on the tiles, packed; a mask with
    # as many kept blocks elsewhere does not (the dense op).
    x, mask, p = _packed(seed=5)
    twin = BlockMask(mask.keep.clone(), mask.block_size, mask.image_size)
    q = pack_map(x * 2, twin, (2, 2))
    assert q.index is not p.index and q.index.same_tiles(p.index)
    y = p + q
    assert type(y) is PackedMap and y.index is p.index
    torch.testing.assert_close(y.to_dense(), 3 * x)
    moved = mask.keep.roll(1, dims=-1)
    other = BlockMask(moved, mask.block_size, mask.image_size)
    assert int(other.keep.sum()) == int(mask.keep.sum()) and not torch.equal(moved, mask.keep)
    r = pack_map(x * other.pixel_mask(2, x.shape[-2:]), other, (2, 2))
    assert r.index.num_tiles == p.index.num_tiles and not r.index.same_tiles(p.index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = p + r
    assert type(z) is torch.Tensor
    torch.testing.assert_close(z, x + r.to_dense())
    assert not p.index.same_tiles(TileIndex.from_mask(twin, (1, 1)))  # another resolution


def test_unknown_in_place_op_raises():
    _, _, p = _packed(seed=4)
    with pytest.raises(NotImplementedError, match="in-place"):
        p.fill_(1.0)
    with pytest.raises(NotImplementedError, match="in-place"):
        p[0] = 1.0


def test_zero_breaking_ops_run_on_the_dense_map():
    """Ops that turn removed zeros into non-zeros give the dense op's result on the dense map, as
    the per-layer (compiled) path does; zero-preserving ones stay packed."""
    x, mask, p = _packed(seed=12)
    bias = torch.randn(1, 3, 1, 1, dtype=x.dtype)
    breaking = [torch.sigmoid, lambda t: t + 1, lambda t: 1 - t, lambda t: t.clamp(min=0.5),
                lambda t: torch.clamp(t, -2.0, -0.5), lambda t: t + bias,
                lambda t: F.hardtanh(t, 0.5, 2.0), lambda t: 2.0 / (t.abs() + 1)]
    keeping = [lambda t: t.clamp(min=0), lambda t: t.clamp(-1.0, 1.0), lambda t: F.hardtanh(t),
               lambda t: t + 0, torch.tanh, lambda t: t / 2, lambda t: -t]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, f in enumerate(breaking):
            y = f(p)
            assert type(y) is torch.Tensor, i
            torch.testing.assert_close(y, f(x), msg=lambda m, i=i: f"breaking {i}: {m}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dense fallback
        for i, f in enumerate(keeping):
            y = f(p)
            assert isinstance(y, PackedMap), i
            torch.testing.assert_close(y.to_dense(), f(x), msg=lambda m, i=i: f"keeping {i}: {m}")
    with pytest.raises(NotImplementedError, match="in-place"):
        p.detach().clone().clamp_(min=0.5)  # would change a dense copy


def test_full_size_dense_operand():
    """A plain map of the packed map's dense shape (a masked-dense layer's output): packed for
    in-place ops and products, exact as it is zero under removed blocks; ``dense += packed``
    changes the dense tensor itself."""
    x, mask, p = _packed(seed=13)
    g = torch.Generator().manual_seed(13)
    d = (torch.randn(x.shape, generator=g, dtype=x.dtype) * mask.pixel_mask(2, x.shape[-2:]))
    d.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the tiles
        q = p * 1.0  # a non-leaf to change in place
        q += d
        r = q * d
    assert isinstance(q, PackedMap) and isinstance(r, PackedMap)
    torch.testing.assert_close(q.to_dense(), x + d)
    torch.testing.assert_close(r.to_dense(), (x + d) * d)
    gx, gd = torch.autograd.grad(r.to_dense().sum(), (x, d))
    wx, wd = torch.autograd.grad(((x + d) * d).sum(), (x, d))
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gd, wd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = p + d  # out of place: the dense sum, exact whatever d holds under removed blocks
        e = d.detach().clone()
        e += p
    assert type(s) is torch.Tensor and type(e) is torch.Tensor
    torch.testing.assert_close(s, x + d)
    torch.testing.assert_close(e, x + d)


def test_to_dense_under_inference_mode():
    """Inference tensors have no version counter: unpacked every time, in-place changes seen."""
    x, mask, _ = _packed(seed=14)
    x = x.detach()
    with torch.inference_mode():
        p = pack_map(x, mask, (2, 2))
        assert p.tiles.is_inference()
        torch.testing.assert_close(p.to_dense(), x)
        p.tiles.mul_(2.0)
        torch.testing.assert_close(p.to_dense(), 2 * x)


@pytest.mark.parametrize("f", [
    lambda t: F.batch_norm(t, None, None, training=True), lambda t: F.conv2d(t, torch.ones(1, 3, 1, 1, dtype=t.dtype)),
    lambda t: F.max_pool2d(t, 2), lambda t: F.avg_pool2d(t, 2), lambda t: F.adaptive_avg_pool2d(t, 1),
    lambda t: F.group_norm(t, 1), lambda t: F.layer_norm(t, t.shape[-1:]),
    lambda t: F.interpolate(t, scale_factor=2.0),
    # nn.SyncBatchNorm across ranks (CUDA only, so its statistics op is called directly here)
    lambda t: torch.batch_norm_stats(t, 1e-5)])
def test_layer_functionals_refuse_packed_maps(f):
    """A module that sparsify did not convert (added or replaced after it) must not run unmasked."""
    _, _, p = _packed(seed=15)
    with pytest.raises(RuntimeError, match="sparsify"):
        f(p)


def test_to_dense_is_cached_until_the_tiles_change():
    _, _, p = _packed(seed=5)
    a = p.to_dense()
    assert (p.to_dense() is a) == CACHES and torch.equal(p.to_dense(), a)
    q = F.relu(p, inplace=True)  # same storage, new version
    b = p.to_dense()
    assert b is not a and torch.equal(b, q.to_dense())


def test_to_dense_cache_keeps_the_graph_after_a_no_grad_read():
    # a dense copy made under no_grad (a logging hook, say) must not serve a differentiable read:
    # the gradient of everything before the map would silently be lost
    x, mask, p = _packed(seed=6)
    with torch.no_grad():
        assert not torch.sigmoid(p).requires_grad  # a zero-breaking op: it reads the dense map
    y = torch.sigmoid(p)
    assert y.requires_grad
    g, = torch.autograd.grad(y.sum(), x)
    pm = mask.pixel_mask(2, x.shape[-2:])  # removed positions are not read from x
    torch.testing.assert_close(g, torch.autograd.grad(torch.sigmoid(x).sum(), x)[0] * pm)
    assert g.abs().sum() > 0


def test_to_dense_cache_never_serves_a_changed_copy(monkeypatch):
    # an in-place change through a view of the dense copy does not reach the map (documented,
    # warned) and must not reach later readers of the map either
    monkeypatch.setattr(P, "_WARNED", set())  # warned once per op name and process
    _, _, p = _packed(seed=7)
    want = p.to_dense().detach().clone()
    with pytest.warns(UserWarning, match="view of a dense copy"):
        v = p[:, :2]
    with torch.no_grad():
        v.mul_(0)
    torch.testing.assert_close(p.to_dense(), want, rtol=0, atol=0)
    d = p.to_dense()
    with torch.no_grad():
        d.add_(1)
    torch.testing.assert_close(p.to_dense(), want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- packed layers
@pytest.mark.parametrize("k,s,pad", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_max_pool_packed_matches_reference_negative_values(k, s, pad):
    """All values negative: a -inf outside the image and zeros under removed blocks differ."""
    mask = random_mask(2, 32, 32, 8, p=0.5, seed=6)
    x = -torch.rand(2, 3, 16, 16, dtype=torch.float64) - 0.1
    x.requires_grad_(True)
    y = P.max_pool2d_map(x, k, s, pad, 1, False, mask=mask, in_stride=(2, 2))
    assert isinstance(y, PackedMap)
    want = masked_max_pool2d_reference(x, k, s, pad, mask=mask, in_stride=(2, 2))
    torch.testing.assert_close(y.to_dense(), want)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(y.to_dense(), x, g)[0],
                               torch.autograd.grad(want, x, g)[0])
    # ceil_mode and unaligned pools run masked-dense
    assert type(P.max_pool2d_map(x, 3, 2, 1, 1, True, mask=mask, in_stride=(2, 2))) is torch.Tensor


@pytest.mark.parametrize("stride", [None, (), [], 3, [3, 3]])
def test_max_pool_packed_default_stride_forms(stride):
    """Every form F.max_pool2d reads as 'stride = kernel' (None, (), []) and the explicit one."""
    mask = random_mask(1, 12, 12, 4, p=0.6, seed=0)
    x = torch.randn(1, 2, 12, 12)
    y = P.max_pool2d_map(pack_map(x, mask, (1, 1)), 3, stride, 1, 1, False, mask=mask, in_stride=(1, 1))
    want = masked_max_pool2d_reference(x, 3, 3, 1, mask=mask)
    assert want.shape[-1] == 4
    torch.testing.assert_close(as_dense(y), want, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_packed_matches_reference(training):
    x, mask, p = _packed(seed=7, c=4)
    rm, rv = torch.randn(4, dtype=x.dtype) * 0.1, torch.rand(4, dtype=x.dtype) + 0.5
    w, b = torch.rand(4, dtype=x.dtype) + 0.5, torch.randn(4, dtype=x.dtype)
    rm2, rv2 = rm.clone(), rv.clone()
    y = P.batch_norm_map(p, rm, rv, w, b, training, 0.1, 1e-5)
    want = masked_batch_norm_reference(x, mask.pixel_mask(2, x.shape[-2:]), rm2, rv2, w, b,
                                       training, 0.1, 1e-5)
    torch.testing.assert_close(y.to_dense(), want)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


@pytest.mark.parametrize("params", ["affine_running", "none"])
@pytest.mark.parametrize("dtype,mean,std", [(torch.float16, 3e4, 8.0), (torch.bfloat16, 1e4, 30.0)], ids=str)
def test_batch_norm_packed_half_parameters_keep_float32_statistics(dtype, mean, std, params):
    # model.half(): weight, bias and running statistics in the tiles' dtype. F.batch_norm with
    # half parameters takes its CPU statistics in half precision (errors 0.025 in fp16, 0.64 in
    # bf16 on outputs of unit size here); the masked-dense path and the reference take them in
    # float32 whatever the parameters' dtype, and so must the tile path
    mask = random_mask(2, 32, 32, 8, p=0.5, seed=3)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    x = x * mask.pixel_mask(2, x.shape[-2:])
    p = pack_map(x, mask, (2, 2))
    w, b = torch.rand(3).to(dtype) + 0.5, torch.randn(3).to(dtype)
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    if params == "none":  # BatchNorm2d(affine=False, track_running_stats=False): no tensor to upcast
        w = b = rm = rv = None
    rm2, rv2 = (None, None) if rm is None else (rm.clone(), rv.clone())
    y = P.batch_norm_map(p, rm, rv, w, b, True, 0.1, 1e-5)
    want = masked_batch_norm_reference(x, mask.pixel_mask(2, x.shape[-2:]), rm2, rv2, w, b, True, 0.1, 1e-5)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(y.to_dense(), want, atol=4 * ulp, rtol=0)
    if rm is not None:
        torch.testing.assert_close(rm, rm2, atol=0, rtol=ulp)
        torch.testing.assert_close(rv, rv2, atol=0, rtol=ulp)


def test_batch_norm_packed_one_or_no_kept_pixel():
    keep = torch.zeros(2, 4, 4, dtype=torch.bool)
    keep[1, 2, 3] = True  # one 1x1 tile at stride 8 with block 8: n == 1
    mask = BlockMask(keep, 8, 32)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * mask.pixel_mask(8, (4, 4))
    for m in (mask, BlockMask(torch.zeros_like(keep), 8, 32)):
        p = pack_map(x, m, (8, 8))
        rm, rv = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)
        y = P.batch_norm_map(p, rm, rv, None, None, True, 0.1, 1e-5)
        assert torch.equal(y.to_dense(), torch.zeros_like(x))
        assert torch.equal(rm, torch.zeros(3, dtype=x.dtype)) and torch.equal(rv, torch.ones(3, dtype=x.dtype))


def test_avg_pool_packed_matches_reference_and_empty_sample():
    keep = torch.rand(3, 4, 4) < 0.5
    keep[1] = False  # nothing kept: zeros, not NaN
    keep[0, 0, 0] = True
    mask = BlockMask(keep, 8, 32)
    x = torch.randn(3, 5, 16, 16, dtype=torch.float64) * mask.pixel_mask(2, (16, 16))
    got = P.packed_avg_pool(pack_map(x, mask, (2, 2)))
    want = masked_avg_pool_reference(x, mask.pixel_mask(2, (16, 16)))
    torch.testing.assert_close(got, want)
    assert torch.equal(got[1], torch.zeros(5, dtype=x.dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_avg_pool_packed_half_sums_in_float32(dtype):
    """A 32 x 32 map of values near 300: its sum (3e5) overflows fp16 and loses bf16's digits;
    the mean must still be the float64 one to the dtype's rounding (audit 88's M13 mutant)."""
    mask = BlockMask(torch.ones(2, 8, 8, dtype=torch.bool), 4, 32)
    x = 300 + torch.rand(2, 3, 32, 32, dtype=torch.float64)
    got = P.packed_avg_pool(pack_map(x.to(dtype), mask, (1, 1)))
    want = x.to(dtype).double().mean(dim=(2, 3))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=0, rtol=2 * torch.finfo(dtype).eps)


def test_conv2d_map_packs_aligned_layers_only():
    mask = random_mask(2, 32, 32, 8, p=0.5, seed=8)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    y = P.conv2d_map(x, w, None, 2, 1, 1, 1, mask=mask, in_stride=(2, 2))
    assert isinstance(y, PackedMap) and y.index.stride == (4, 4)
    torch.testing.assert_close(y.to_dense(), masked_conv2d_reference(
        x, w, None, 2, 1, 1, 1, mask=mask, in_stride=(2, 2)))
    # stride 16 with block 8 is not tile-aligned: masked-dense, dense out
    y2 = P.conv2d_map(y, torch.randn(4, 4, 3, 3, dtype=torch.float64), None, 4, 1, 1, 1,
                      mask=mask, in_stride=(4, 4))
    assert type(y2) is torch.Tensor


# ----------------------------------------------------------------------------- in a ResNet
def _cifar18():
    from test_sparsify_resnet import _cifar_resnet
    return _cifar_resnet()


@pytest.mark.parametrize("block,packs,unpacks", [(8, 1, 0), (4, 1, 1)])
def test_resnet_packs_once_and_unpacks_only_where_unaligned(monkeypatch, block, packs, unpacks):
    """CIFAR ResNet at 32 px, strides 1..8: block 8 keeps every map packed from the stem to the
    pool; block 4 leaves the layout once, before layer4 (stride 8), for both of its branches."""
    calls = {"pack": 0, "unpack": 0}

    def spy(name, real):
        def f(*a, **k):
            calls[name] += 1
            return real(*a, **k)
        return f

    monkeypatch.setattr(P, "pack", spy("pack", P.pack))
    monkeypatch.setattr(P, "unpack", spy("unpack", P.unpack))
    model = R.sparsify(_cifar18())
    keep = random_mask(2, 32, 32, block, p=0.5, seed=1).keep
    with R.block_mask(keep, block):
        y = model(torch.randn(2, 3, 32, 32))
    y.sum().backward()
    assert calls == {"pack": packs, "unpack": unpacks * (1 if CACHES else 2)}  # 2 branches


def test_resnet_packed_equals_unpacked_path(monkeypatch):
    """The packed layout changes no number: the same model with packing disabled (every layer
    dense in, dense out) gives the same outputs, gradients and running statistics."""
    torch.manual_seed(0)
    a = R.sparsify(_cifar18().double())
    b = copy.deepcopy(a)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    keep = random_mask(2, 32, 32, 8, p=0.5, seed=2).keep
    with R.block_mask(keep, 8):
        ya = a(x)
    monkeypatch.setattr(P, "packing_enabled", lambda: False)
    with R.block_mask(keep, 8):
        yb = b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
    ya.sum().backward()
    yb.sum().backward()
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-11,
                                   msg=lambda m, k=k: f"{k}: {m}")
    for (k, ba), bb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(ba, bb, rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("block,size,n_dense", [(16, 64, 11), (8, 32, 21), (30, 60, 40), (32, 64, 0)])
def test_tile_plan_says_which_layers_stay_packed(block, size, n_dense):
    """tile_plan predicts the run: a conv / BN / max pool returns a PackedMap iff 'tiles'."""
    import torchvision

    model = R.sparsify(torchvision.models.resnet18())
    plan = R.tile_plan(model, block, size)
    assert sum(v == "masked-dense" for v in plan.values()) == n_dense
    seen = {}
    # the global pool: "tiles" iff it pools a PackedMap (its output is a dense [N, C, 1, 1])
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, type(a[0] if n == "avgpool" else o)))
             for n, m in model.named_modules() if n in plan]
    keep = random_mask(2, size, size, block, p=0.6, seed=3).keep
    with R.block_mask(keep, block):
        model(torch.randn(2, 3, size, size))
    for h in hooks:
        h.remove()
    assert seen and all((t is PackedMap) == (plan[n] == "tiles") for n, t in seen.items()), \
        {n: (t.__name__, plan[n]) for n, t in seen.items()}


def test_per_sample_scale_stays_packed():
    """Drop-path / stochastic depth scale each sample by a [N, 1, 1, 1] tensor."""
    x, mask, p = _packed(seed=11, n=3)
    keep = torch.tensor([1.0, 0.0, 2.0], dtype=x.dtype).view(3, 1, 1, 1)
    per_c = torch.randn(3, 3, 1, 1, dtype=x.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dense fallback
        noise = p.new_empty((3, 1, 1, 1))  # shape-only: no unpack either
        y = p.div(0.5) * keep + p * per_c
    assert isinstance(y, PackedMap) and noise.shape == (3, 1, 1, 1)
    torch.testing.assert_close(y.to_dense(), x.div(0.5) * keep + x * per_c)


def test_timm_drop_path_stays_packed_and_matches_unpacked(monkeypatch):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=4, drop_path_rate=0.5).double().train()
    R.sparsify(model)
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    keep = random_mask(3, 64, 64, 16, p=0.6, seed=4).keep
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every op of timm's forward stays on the tiles
        with R.block_mask(keep, 16):
            ya = model(x)
    monkeypatch.setattr(P, "packing_enabled", lambda: False)
    torch.manual_seed(5)  # the same drop-path draws
    with R.block_mask(keep, 16):
        yb = model(x)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)


def test_dropout2d_drops_whole_sample_channel_planes():
    # nn.Dropout2d on a packed map: one draw per (sample, channel), shared by all its tiles, as
    # on the dense map; identity in eval; in place keeps the map (it crashed before)
    x, mask, p = _packed(seed=3, n=4, c=16)
    assert F.dropout2d(p, 0.5, training=False) is p
    assert F.dropout2d(p, 0.5, training=False, inplace=True) is p
    dense = x.detach()
    kept = mask.pixel_mask(2, x.shape[-2:]).expand_as(dense).bool()
    for inplace in (False, True):
        q = P.PackedMap.from_tiles(p.tiles.detach().clone(), p.index, p.mask)
        y = F.dropout2d(q, 0.5, training=True, inplace=inplace)
        assert isinstance(y, PackedMap) and (y is q) == inplace
        ratio = torch.where(kept, y.to_dense() / dense, torch.nan)
        for n in range(4):
            for c in range(16):
                r = ratio[n, c][kept[n, c]]
                assert r.numel() and torch.allclose(r, r[0].expand_as(r)) and r[0].item() in (0.0, 2.0)
        planes = ratio.nan_to_num(-1).amax((2, 3))  # the plane's factor, 0 or 2
        assert (planes == 0).any() and (planes == 2).any()


# ----------------------------------------------------------------------------- tensor protocol edges
def test_gradient_hooks_retain_grad_and_grad_are_packed():
    # they used to reach a throw-away dense copy: .grad None, hooks never called (Grad-CAM, logging)
    x, mask, p = _packed(seed=11)
    leaf = p.detach().requires_grad_()
    pm = mask.pixel_mask(2, x.shape[-2:]).to(x.dtype)
    torch.tanh(leaf).sum().backward()
    assert isinstance(leaf.grad, PackedMap)
    torch.testing.assert_close(leaf.grad.to_dense(), (1 - torch.tanh(x.detach()) ** 2) * pm)
    leaf.grad = None
    assert leaf.grad is None
    q = leaf * 2.0
    q.retain_grad()
    seen = []
    q.register_hook(lambda g: seen.append(g))
    (q * 3.0).sum().backward()
    assert len(seen) == 1 and isinstance(seen[0], PackedMap) and seen[0].shape == x.shape
    torch.testing.assert_close(q.grad.to_dense(), 3 * pm.expand_as(x))
    torch.testing.assert_close(leaf.grad.to_dense(), 6 * pm.expand_as(x))
    # a hook's return value replaces the gradient: a PackedMap, or a dense map (packed)
    for hook, want in [(lambda g: g * 0, 0 * pm), (lambda g: torch.ones(x.shape, dtype=x.dtype), pm)]:
        leaf.grad = None
        r = leaf * 1.0
        r.register_hook(hook)
        r.sum().backward()
        torch.testing.assert_close(leaf.grad.to_dense(), want.expand_as(x))
    leaf.grad = torch.zeros(x.shape, dtype=x.dtype)  # a dense gradient set by hand is packed
    assert isinstance(leaf.grad, PackedMap) and leaf.grad.to_dense().abs().sum() == 0


def test_tensor_hook_in_a_forward_hook_of_a_sparsified_resnet():
    # Grad-CAM's pattern: a forward hook registers a hook on the layer's output
    model = R.sparsify(_cifar18())
    grads = []

    def forward_hook(module, inputs, output):
        output.register_hook(grads.append)  # (returning the handle would replace the output)

    model.layer2.register_forward_hook(forward_hook)
    keep = random_mask(2, 32, 32, 8, p=0.5, seed=3).keep
    with R.block_mask(keep, 8):
        y = model(torch.randn(2, 3, 32, 32))
    y.sum().backward()
    assert len(grads) == 1 and isinstance(grads[0], PackedMap) and grads[0].shape == (2, 128, 16, 16)
    removed = ~BlockMask(keep, 8, 32).pixel_mask(2, (16, 16)).expand(2, 128, 16, 16)
    g = grads[0].to_dense()
    assert g.abs().sum() > 0 and (g[removed] == 0).all()


@pytest.mark.parametrize("handle", ["data", "numpy"])
def test_shared_memory_handles_do_not_poison_the_cache(handle):
    # writes through .data / .numpy() went into to_dense()'s cached copy, unseen by its version
    # check: ops off the tiles then saw another map than ops on them
    x, mask, p = _packed(seed=12)
    p = p.detach()
    dense = p.to_dense()
    h = p.data if handle == "data" else p.numpy()
    h[...] = 7
    assert torch.equal(p.to_dense(), dense) and torch.equal(p.tiles, P.pack(dense, p.index))


def test_products_with_bool_and_integer_maps(monkeypatch):
    monkeypatch.setattr(P, "_WARNED", set())
    x, mask, p = _packed(seed=13)
    d = x.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the comparisons run on the dense map
        got = [p * (p > 0), p * (d > 0), p * (d > 0).long(), (d > 0) * p]
    for g in got:
        assert isinstance(g, PackedMap)
        torch.testing.assert_close(g.to_dense(), d * (d > 0))
    q = p.detach().clone()
    q.mul_(d > 0)
    torch.testing.assert_close(q.to_dense(), d * (d > 0))


def test_layout_queries_do_not_unpack(monkeypatch):
    _, _, p = _packed(seed=14)
    calls = []
    monkeypatch.setattr(P, "unpack", lambda *a, **k: calls.append(1))
    assert p.stride() == (3 * 16 * 16, 16 * 16, 16, 1) and p.stride(1) == 256
    assert p.is_contiguous() and not p.is_contiguous(memory_format=torch.channels_last)
    assert calls == []


def test_small_protocol_errors_and_property_warnings(monkeypatch):
    x, mask, p = _packed(seed=15)
    with pytest.raises(IndexError, match=r"Dimension out of range \(expected to be in range of \[-4, 3\]"):
        p.size(4)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got 1.5"):
        F.dropout2d(p, 1.5)
    with pytest.raises(TypeError, match="expected a TileIndex and a BlockMask, got BlockMask and BlockMask"):
        PackedMap.from_tiles(p.tiles, mask, mask)
    with pytest.raises(TypeError, match="tiles must be a floating-point tensor, got torch.int64"):
        PackedMap.from_tiles(p.tiles.long(), p.index, mask)
    # tiles of another size or count than the index's: a wrong map, not a map
    for bad in (p.tiles[..., :-1], p.tiles[:-1], p.tiles[0]):
        with pytest.raises(ValueError, match="do not match"):
            PackedMap.from_tiles(bad, p.index, mask)
    q = p.detach().clone()
    monkeypatch.setattr(P, "_WARNED", set())
    with pytest.warns(UserWarning, match="PackedMap: Tensor.mT does not run on the tiles"):
        q.mT
    with pytest.warns(UserWarning, match="PackedMap: Tensor.real does not run on the tiles"):
        q.real  # each property warns under its own name, not one '__get__' for all


def test_hook_on_a_map_changed_in_place():
    # an in-place op runs on an alias of the tiles; registering a hook on the map afterwards
    # segfaulted in torch 2.14 (its history is regenerated inside register_hook)
    x, mask, p = _packed(seed=16)
    q = p * 1.0
    q.mul_(2.0)
    q.relu_()
    seen = []
    q.register_hook(seen.append)
    q.retain_grad()
    (q * 3.0).sum().backward()
    assert len(seen) == 1 and isinstance(q.grad, PackedMap)
    torch.testing.assert_close(seen[0].to_dense(), q.grad.to_dense())
    pm = mask.pixel_mask(2, x.shape[-2:])
    torch.testing.assert_close(x.grad, (6.0 * (x.detach() > 0) * pm).to(x.dtype))


def test_to_dense_copy_made_outside_hooks_does_not_serve_a_recomputation():
    # read inside a checkpoint (under its forward's hooks), then outside it (no hooks): the
    # copy cached by the outside read must not serve the recomputation, which must unpack again
    # as its forward did (else a different count of saved tensors: a CheckpointError)
    import torch.utils.checkpoint
    x, mask, p = _packed(seed=21)
    y = torch.utils.checkpoint.checkpoint(lambda t: t.to_dense().square().sum(), p,
                                          use_reentrant=False)
    z = p.to_dense().sum()
    (y + z).backward()
    pm = mask.pixel_mask(2, x.shape[-2:])
    torch.testing.assert_close(x.grad, (2 * x.detach() + 1) * pm)


def test_quotient_of_two_maps_runs_on_the_dense_map():
    # map / map is 0 / 0 = NaN under removed blocks on the dense map: not zero-preserving
    x, mask, p = _packed(seed=16)
    q = pack_map(x * 2, mask, (2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = p / q
    assert type(y) is torch.Tensor
    torch.testing.assert_close(y, x / (x * 2), equal_nan=True)


def test_conv2d_map_repacks_a_map_of_another_mask():
    # a PackedMap of another mask (same geometry and tile count, other blocks) is not its tiles
    x, mask, p = _packed(seed=17)
    moved = BlockMask(mask.keep.roll(1, dims=-1), mask.block_size, mask.image_size)
    w = torch.randn(4, 3, 3, 3, dtype=x.dtype)
    y = P.conv2d_map(p, w, None, 1, 1, 1, 1, mask=moved, in_stride=(2, 2))
    assert isinstance(y, PackedMap)
    torch.testing.assert_close(y.to_dense(), masked_conv2d_reference(
        x, w, None, 1, 1, 1, 1, mask=moved, in_stride=(2, 2)))


def test_batch_norm_packed_with_a_cross_rank_reduce_matches_reference():
    # SyncBatchNorm's reduce (the other ranks' sums added) must be applied on the tile path
    x, mask, p = _packed(seed=18, c=4)
    other = torch.linspace(1.0, 2.0, 5, dtype=x.dtype)  # another rank's sums and count

    def reduce(t):
        return t + (other if t.numel() == 5 else other[:4])

    rm, rv = torch.zeros(4, dtype=x.dtype), torch.ones(4, dtype=x.dtype)
    rm2, rv2 = rm.clone(), rv.clone()
    y = P.batch_norm_map(p, rm, rv, None, None, True, 0.1, 1e-5, reduce=reduce)
    want = masked_batch_norm_reference(x, mask.pixel_mask(2, x.shape[-2:]), rm2, rv2, None, None,
                                       True, 0.1, 1e-5, reduce=reduce)
    torch.testing.assert_close(y.to_dense(), want)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


def test_in_place_ops_on_the_tiles_return_the_map_itself():
    """relu_, F.relu(inplace=True), nn.ReLU(inplace=True), mul_, F.hardtanh(..., True): the map
    itself comes back, as torch returns self; values and the input's gradient as the dense ops'."""
    x, mask, _ = _packed(seed=22)
    ops = (torch.Tensor.relu_, lambda t: F.relu(t, inplace=True), nn.ReLU(inplace=True),
           lambda t: t.mul_(2.0), lambda t: F.hardtanh(t, -0.5, 0.5, True))
    for op in ops:
        p = pack_map(x * 1, mask, (2, 2))
        assert op(p) is p
        want = op(x.detach().clone())
        torch.testing.assert_close(p.to_dense(), want)
    p = pack_map(x * 1, mask, (2, 2))
    p.relu_().to_dense().sum().backward()
    torch.testing.assert_close(x.grad, (x.detach() > 0).to(x.dtype) * mask.pixel_mask(2, x.shape[-2:]))
    assert type(F.relu(p)) is PackedMap and F.relu(p) is not p  # out of place: a new map


def test_autograd_grad_with_respect_to_a_map():
    # torch.autograd.grad(..., inputs=map) used to differentiate a dense copy made after the
    # graph ("appears to not have been used in the graph"); a map changed in place included
    x, mask, p = _packed(seed=23)
    pm = mask.pixel_mask(2, x.shape[-2:])
    q = p * 2.0
    q.relu_()
    w = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(1))
    g, = torch.autograd.grad((q.to_dense() * w).sum(), q)
    assert isinstance(g, PackedMap) and g.index is q.index
    torch.testing.assert_close(g.to_dense(), w * pm)
    # as outputs: a packed and a dense gradient give the dense chain's (relu(2 x), masked) input gradient
    torch.testing.assert_close(q.to_dense(), (2.0 * x.detach()).relu() * pm)
    want = torch.autograd.grad(2.0 * x * (2.0 * x > 0), x, w * pm)[0]
    for gq in (w, pack_map(w, mask, (2, 2))):
        q = (p * 2.0).relu_()
        gx, gq_in = torch.autograd.grad(q, (x, q), gq, retain_graph=True)
        torch.testing.assert_close(gx, want)
        torch.testing.assert_close(gq_in.to_dense(), w * pm)
    with pytest.raises(ValueError, match=r"grad_outputs for a map of shape \(2, 3, 16, 16\)"):
        torch.autograd.grad(q, x, torch.ones(2, 3, 16, 15))


def test_backward_with_a_map_among_the_inputs_or_outputs():
    x, mask, _ = _packed(seed=24)
    pm = mask.pixel_mask(2, x.shape[-2:])
    w = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(2))

    def q_of_x():
        return (pack_map(x * 1, mask, (2, 2)) * 2.0).relu_()

    q = q_of_x()
    (q.to_dense() * w).sum().backward(inputs=[q])  # the map's own .grad, x's untouched
    assert x.grad is None and isinstance(q.grad, PackedMap)
    torch.testing.assert_close(q.grad.to_dense(), w * pm)
    want = 2.0 * w * pm * (x.detach() > 0)
    # torch.autograd.backward hands subclasses to __torch_function__ in recent torch (2.14; before, it
    # runs on the tiles directly and refuses a dense gradient for a map: a shape mismatch)
    dispatches = "has_torch_function" in inspect.getsource(torch.autograd.backward)
    for g in (w, pack_map(w, mask, (2, 2))):  # Tensor.backward and torch.autograd.backward
        x.grad = None
        q_of_x().backward(g)
        torch.testing.assert_close(x.grad, want)
        if dispatches or isinstance(g, PackedMap):
            x.grad = None
            torch.autograd.backward([q_of_x()], [g])
            torch.testing.assert_close(x.grad, want)
    with pytest.raises(ValueError, match="the gradient for a map of shape"):
        q_of_x().backward(torch.ones(2, 3, 16))


_FUNCTION_ON_A_MAP_CHANGED_IN_PLACE = """
import sys
sys.path.insert(0, {here!r})
import torch
from test_packed_map import _packed

class Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t * 2.0

    @staticmethod
    def backward(ctx, g):
        return g * 2.0

x, mask, p = _packed(seed=25)
q = p * 1.0
q.relu_()
y = Twice.apply(q)
y.to_dense().sum().backward()
print(type(y).__name__, float((x.grad - 2.0 * (x.detach() > 0) * mask.pixel_mask(2, x.shape[-2:])).abs().max()))
"""


def test_autograd_function_on_a_map_changed_in_place():
    # torch regenerates the history of a map changed in place on the first read of its grad_fn,
    # holding its autograd lock, and resets its backward hooks through __torch_function__: the
    # map unpacked itself there and deadlocked (Function.apply, a reentrant checkpoint). In a
    # child process, so a regression fails instead of hanging the suite.
    import os
    import subprocess
    import sys
    code = _FUNCTION_ON_A_MAP_CHANGED_IN_PLACE.format(here=os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("autograd.Function.apply on a map changed in place hung")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["PackedMap", "0.0"]


def test_requires_grad_setter_and_version_are_the_tiles():
    # both went to a dense copy: `p.requires_grad = True` left the map without gradients and
    # `_version` stayed that of the cached copy
    x, mask, _ = _packed(seed=26)
    p = pack_map(x.detach(), mask, (2, 2))
    assert not p.requires_grad and p.is_leaf
    p.requires_grad = True
    assert p.requires_grad
    (p * 2.0).to_dense().sum().backward()
    assert isinstance(p.grad, PackedMap)
    torch.testing.assert_close(p.grad.to_dense(), 2.0 * mask.pixel_mask(2, x.shape[-2:]).expand_as(x).to(x.dtype))
    q = p.detach()
    q.to_dense()  # cache a dense copy
    v = q._version
    q.mul_(2.0)
    assert q._version == v + 1 == q.tiles._version


def test_post_accumulate_grad_hook_on_a_leaf_map_and_a_penalty_through_a_map():
    # the hook went to a dense copy (refused as "non-leaf"); it now sees the map after its .grad
    # is accumulated. A gradient penalty differentiates the map's packed gradient again.
    x, mask, _ = _packed(seed=27)
    pm = mask.pixel_mask(2, x.shape[-2:]).to(x.dtype)
    p = pack_map(x.detach(), mask, (2, 2)).requires_grad_()
    seen = []
    p.register_post_accumulate_grad_hook(lambda t: seen.append((t is p, t.grad.to_dense().clone())))
    (p * 2.0).to_dense().sum().backward()
    assert len(seen) == 1 and seen[0][0]
    torch.testing.assert_close(seen[0][1], 2.0 * pm.expand_as(x))
    q = (pack_map(x * 1, mask, (2, 2)) * 2.0).relu_()
    g, = torch.autograd.grad((q.to_dense() ** 2).sum(), q, create_graph=True)
    gx, = torch.autograd.grad((g.to_dense() ** 2).sum(), x)
    # q = relu(2x) m, g = 2q, penalty sum(4 q^2): d/dx = 8 q * 2 [2x > 0] m
    qd = (2.0 * x.detach()).relu() * pm
    torch.testing.assert_close(gx, 16.0 * qd * (x.detach() > 0) * pm)


# ----------------------------------------------------------------------------- more maps
def test_hook_returning_a_dense_gradient_replaces_it():
    # a hook's dense return value (not all ones: that equals the gradient of a sum) is packed
    # and replaces the gradient
    x, mask, p = _packed(seed=12)
    leaf = p.detach().requires_grad_()
    pm = mask.pixel_mask(2, x.shape[-2:]).to(x.dtype)
    g = torch.randn(x.shape, dtype=x.dtype)
    r = leaf * 1.0
    r.register_hook(lambda _: g)
    r.sum().backward()
    torch.testing.assert_close(leaf.grad.to_dense(), g * pm)


def test_backward_with_a_packed_gradient_of_another_mask():
    # a PackedMap gradient of another mask (same tile count, other blocks) is its dense map,
    # not tiles of the output's index
    x, mask, p = _packed(seed=17)
    moved = BlockMask(mask.keep.roll(1, dims=-1), mask.block_size, mask.image_size)
    gd = torch.randn(x.shape, dtype=x.dtype)
    g = pack_map(gd, moved, (2, 2))
    assert g.index.num_tiles == p.index.num_tiles and not g.index.same_tiles(p.index)
    (p * 1.0).backward(g)
    both = mask.pixel_mask(2, x.shape[-2:]) * moved.pixel_mask(2, x.shape[-2:])
    torch.testing.assert_close(x.grad, gd * both)
    x.grad = None
    (gx,) = torch.autograd.grad(pack_map(x, mask, (2, 2)) * 1.0, x, g)
    torch.testing.assert_close(gx, gd * both)


def test_batched_grad_outputs_for_a_map_output_are_refused():
    x, mask, p = _packed(seed=19)
    with pytest.raises(NotImplementedError, match="is_grads_batched"):
        torch.autograd.grad(p * 2.0, x, torch.randn(3, *x.shape, dtype=x.dtype), is_grads_batched=True)


def test_maps_of_masks_with_another_batch_do_not_combine():
    # a mask with one more sample (keeping no block) has the same kept list but another batch:
    # its maps are not this mask's tiles
    x, mask, p = _packed(seed=20)
    keep3 = torch.cat([mask.keep, torch.zeros_like(mask.keep[:1])])
    mask3 = BlockMask(keep3, mask.block_size, mask.image_size)
    x3 = torch.cat([x.detach(), torch.zeros_like(x[:1])])
    q = pack_map(x3, mask3, (2, 2))
    assert q.index.num_tiles == p.index.num_tiles and not q.index.same_tiles(p.index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="must match the size of tensor b"):  # dense: 2 vs 3 samples
            p + q
    w = torch.randn(4, 3, 3, 3, dtype=x.dtype)
    with pytest.raises(ValueError, match="mask batch 3 does not match x batch 2"):
        P.conv2d_map(p, w, None, 1, 1, 1, 1, mask=mask3, in_stride=(2, 2))


def test_to_dense_cache_is_per_memory_format():
    # a channels-last read must not serve a later contiguous one (.view on it would fail)
    x, mask, p = _packed(seed=22)
    a = p.to_dense(memory_format=torch.channels_last)
    assert a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
    b = p.to_dense()
    assert b.is_contiguous()
    b.view(-1)
    torch.testing.assert_close(b, x.detach())
    assert p.to_dense(memory_format=torch.channels_last).is_contiguous(memory_format=torch.channels_last)


def test_tensor_keyword_operand_runs_on_the_dense_map():
    # torch.add(p, other=bias): a tensor among the keywords is not checked for zeros under
    # removed blocks, so the op runs on the dense map (bias there too)
    x, mask, p = _packed(seed=25)
    b = torch.randn(1, 3, 1, 1, dtype=x.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = torch.add(p, other=b)
        e = torch.randn(x.shape, dtype=x.dtype).exp()
        z = torch.mul(p, other=e)
    assert type(y) is torch.Tensor
    torch.testing.assert_close(y, x.detach() + b)
    torch.testing.assert_close(as_dense(z), x.detach() * e)


def test_plain_tensor_changed_in_place_by_a_map():
    # d.mul_(p) / d.add_(p) change the plain d (the dense op), not a packed copy of it
    x, mask, p = _packed(seed=23)
    p = p.detach()
    for op in ("mul_", "add_"):
        d = torch.randn(x.shape, dtype=x.dtype)
        want = getattr(d.clone(), op)(x.detach())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = getattr(d, op)(p)
        assert out is d
        torch.testing.assert_close(d, want)


def test_in_place_keyword_on_the_dense_path_raises():
    # F.hardsigmoid(inplace=True) does not run on the tiles: in place it would change a copy
    x, mask, p = _packed(seed=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotImplementedError, match="in-place"):
            F.hardsigmoid(p, inplace=True)


def test_conv2d_and_max_pool_maps_with_a_non_square_stride():
    # stride (1, 2): the output index is at (sh * 1, sw * 2), tiles (4, 2)
    x, mask, p = _packed(seed=26)
    w = torch.randn(4, 3, 3, 3, dtype=x.dtype)
    y = P.conv2d_map(p, w, None, (1, 2), 1, 1, 1, mask=mask, in_stride=(2, 2))
    assert isinstance(y, PackedMap) and y.index.stride == (2, 4) and y.shape == (2, 4, 16, 8)
    torch.testing.assert_close(y.to_dense(), masked_conv2d_reference(
        x, w, None, (1, 2), 1, 1, 1, mask=mask, in_stride=(2, 2)))
    z = P.max_pool2d_map(p, 3, (1, 2), 1, 1, False, mask=mask, in_stride=(2, 2))
    assert isinstance(z, PackedMap) and z.index.stride == (2, 4)
    torch.testing.assert_close(z.to_dense(), masked_max_pool2d_reference(
        x, 3, (1, 2), 1, 1, False, mask=mask, in_stride=(2, 2)))


def test_layers_on_non_square_tiles_read_the_image_edge_as_padding():
    # tiles (4, 2) at stride (2, 4): the halo past the right / bottom edge is padding, not data
    x, mask, p = _packed(seed=27)
    w = torch.randn(4, 3, 3, 3, dtype=x.dtype)
    y = P.conv2d_map(p, w, None, (1, 2), 1, 1, 1, mask=mask, in_stride=(2, 2))
    yd = y.to_dense().detach()
    w2 = torch.randn(5, 4, 3, 3, dtype=x.dtype)
    z = P.conv2d_map(y, w2, None, 1, 1, 1, 1, mask=mask, in_stride=(2, 4))
    assert isinstance(z, PackedMap)
    torch.testing.assert_close(z.to_dense(), masked_conv2d_reference(
        yd, w2, None, 1, 1, 1, 1, mask=mask, in_stride=(2, 4)))
    m = P.max_pool2d_map(y, 3, 1, 1, 1, False, mask=mask, in_stride=(2, 4))
    assert isinstance(m, PackedMap)
    torch.testing.assert_close(m.to_dense(), masked_max_pool2d_reference(
        yd, 3, 1, 1, 1, False, mask=mask, in_stride=(2, 4)))


def test_conv2d_map_checks_the_weight_against_the_map():
    # F.conv2d's own errors would describe the halo'd tiles ("input[20, 3, 6, 6]"), not the map
    x, mask, p = _packed(seed=3)
    w = torch.randn(4, 3, 3, 3, dtype=x.dtype)
    cases = [((torch.randn(4, 2, 3, 3, dtype=x.dtype), None, 1), "the input has 3 channels"),
             ((w, torch.randn(5, dtype=x.dtype), 1), r"bias must be None or a \[4\] tensor"),
             ((w, None, 1.0), "groups must be an int")]
    for (weight, bias, groups), match in cases:
        with pytest.raises(ValueError, match=match):
            P.conv2d_map(p, weight, bias, 1, 1, 1, groups, mask=mask, in_stride=(2, 2))
