"""sparsify on small models beyond the stock ResNets, against the section 2 references: modules
replaced after sparsify, spatial reductions outside the global pool, inference mode, layers that
change the map size at stride 1, residual adds of a dense map into a packed one, and the default
trace input. A model-level oracle is the same sparsified model with every layer forced onto the
masked-dense references (``_force_dense``)."""
import contextlib
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effssl_kernels.sparse.conv as C
import effssl_kernels.sparse.packed as P
from effssl_kernels.masks import BlockMask
from effssl_kernels.nn import resnet as R
from effssl_kernels.reference.masked_net import (
    masked_avg_pool_reference,
    masked_batch_norm_reference,
    masked_conv2d_reference,
    masked_max_pool2d_reference,
)

from test_sparsify_resnet import _assert_states_close, _bn_state, _randomize_bn


_EX = torch.zeros(1, 3, 16, 16, dtype=torch.float64)  # the trace input


@contextlib.contextmanager
def _force_dense(monkeypatch):
    """Every layer masked-dense: no tile path, so no PackedMap anywhere."""
    with monkeypatch.context() as mp:
        mp.setattr(P, "conv_tile_halo", lambda *a, **k: None)
        mp.setattr(C, "conv_tile_halo", lambda *a, **k: None)
        yield


def _run(model, x, keep, block, train=True):
    """(output, input grad, parameter grads, BN buffers) of one masked step."""
    model.train(train)
    x = x.clone().requires_grad_(True)
    with R.block_mask(keep, block):
        y = model(x)
    y = P.as_dense(y)
    g = torch.Generator().manual_seed(7)
    (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    bufs = {k: b.clone() for k, b in model.named_buffers()}
    return y.detach(), x.grad, grads, bufs


def _assert_runs_close(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a[1], b[1], rtol=1e-10, atol=1e-12)
    for k in a[2]:
        torch.testing.assert_close(a[2][k], b[2][k], rtol=1e-9, atol=1e-11, msg=k)
    for k in a[3]:
        torch.testing.assert_close(a[3][k], b[3][k], rtol=1e-10, atol=1e-12, msg=k)


def _head_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


# ----------------------------------------------------------------------------- finding: order
def test_sync_batch_norm_after_sparsify_raises_then_sparsify_again_converts():
    """convert_sync_batchnorm after sparsify replaces the converted BN with a plain one: its
    forward on a packed map raises (no silent unmasked BN); sparsify again converts it."""
    torch.manual_seed(0)
    good = R.sparsify(_randomize_bn(_head_net()).double(), example_input=_EX)
    late = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(good))
    assert type(late[1]) is nn.SyncBatchNorm and R.is_sparse(late)
    keep = torch.tensor([[[True, False], [False, False]], [[True, True], [False, True]]])
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="sparsify"), R.block_mask(keep, 8):
        late.eval()(x)  # eval: the raising forward moves no buffer
    assert R.sparsify(late) is late
    assert isinstance(late[1], nn.SyncBatchNorm) and type(late[1]) is not nn.SyncBatchNorm
    assert R.input_strides(late) == R.input_strides(good)
    _assert_runs_close(_run(late, x, keep, 8), _run(good, x, keep, 8))
    assert R.sparsify(late) is late  # fully converted: nothing to do


def test_sync_batch_norm_before_sparsify():
    torch.manual_seed(0)
    base = _randomize_bn(_head_net()).double()
    good = R.sparsify(copy.deepcopy(base), example_input=_EX)
    early = R.sparsify(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base)),
                       example_input=_EX)
    keep = torch.tensor([[[True, False], [False, False]], [[True, True], [False, True]]])
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    _assert_runs_close(_run(early, x, keep, 8), _run(good, x, keep, 8))


def test_new_head_after_sparsify_is_converted_and_traced():
    """A conv stage appended after sparsify: converted by a second sparsify with its stride."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU())
    model = nn.Sequential(body, nn.AdaptiveAvgPool2d(1))
    R.sparsify(model.double(), example_input=_EX)
    model.insert(1, nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1), nn.BatchNorm2d(4)).double())
    R.sparsify(model, example_input=_EX)
    assert R.input_strides(model) == {"0.0": (1, 1), "0.1": (2, 2), "1.0": (2, 2),
                                      "1.1": (4, 4), "2": (4, 4)}
    keep = torch.tensor([[[True, False], [False, True]]])
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    oracle = copy.deepcopy(model)
    got = _run(model, x, keep, 8)
    with pytest.MonkeyPatch.context() as mp, _force_dense(mp):
        want = _run(oracle, x, keep, 8)
    _assert_runs_close(got, want)


# ----------------------------------------------------------------------------- spatial reductions
class _Reduce(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.conv, self.how = nn.Conv2d(3, 4, 3, padding=1), how

    def forward(self, x):
        h = self.conv(x)
        if self.how == "mean":
            return h.mean((2, 3))
        if self.how == "flatten_mean":
            return h.flatten(2).mean(-1)
        if self.how == "sum":
            return h.sum((2, 3))
        return torch.flatten(self.pool(h), 1)


@pytest.mark.parametrize("how", ["mean", "flatten_mean", "sum"])
def test_spatial_reduction_outside_the_pool_is_refused(how):
    """Under a mask x.mean((2, 3)) would average removed zeros: refused, pointing at the pool."""
    m = _Reduce(how)
    with pytest.raises(TypeError, match="AdaptiveAvgPool2d"):
        R.sparsify(m, example_input=torch.zeros(1, 3, 16, 16))
    assert not R.is_sparse(m)


class _SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.conv(x)
        return h * self.fc(self.pool(h)).sigmoid()


def test_conv_of_a_global_pool_is_refused_by_name():
    """A squeeze-and-excitation conv reads a pooled [N, C, 1, 1] vector, no map a mask follows:
    refused, naming the module (torchvision's regnet_y said only 'has no known stride')."""
    m = _SqueezeExcite()
    with pytest.raises(TypeError, match=r"input of fc \(Conv2d\) is not a feature map.*squeeze-and-excitation"):
        R.sparsify(m, example_input=torch.zeros(1, 3, 16, 16))
    assert not R.is_sparse(m)


def test_global_pool_then_flatten_is_the_kept_mean():
    torch.manual_seed(0)
    m = _Reduce("pool")
    m.pool = nn.AdaptiveAvgPool2d(1)
    R.sparsify(m.double(), example_input=_EX)
    keep = torch.tensor([[[True, False], [False, False]], [[False, True], [True, True]]])
    mask = BlockMask(keep, 8, 16)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with R.block_mask(mask):
        y = m(x)
    h = masked_conv2d_reference(x, m.conv.weight, m.conv.bias, 1, 1, mask=mask)
    torch.testing.assert_close(y, masked_avg_pool_reference(h, mask.pixel_mask(1, (16, 16))))


# ----------------------------------------------------------------------------- inference mode
def test_inference_mode_with_masked_dense_layers():
    """resnet18, block 16 at 64 px: layer4 runs masked-dense, so packed maps are unpacked."""
    torchvision = pytest.importorskip("torchvision")
    m = R.sparsify(torchvision.models.resnet18(num_classes=4)).eval()
    assert R.tile_plan(m, 16, 64)["layer4.0.conv1"] == "masked-dense"
    x = torch.randn(2, 3, 64, 64)
    keep = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.6
    keep[:, 0, 0] = True
    with torch.no_grad(), R.block_mask(keep, 16):
        want = m(x)
    with torch.inference_mode(), R.block_mask(keep, 16):
        got = m(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- size-changing layers
def test_keep_grid_with_a_padding0_conv_at_stride_1():
    """block_mask(keep, B) takes the image size from the first layer's input only: a BN and a
    max pool at stride 1 after a padding-0 conv see 14x14 maps of the 16x16 image."""
    torch.manual_seed(0)
    m = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                    nn.MaxPool2d(3, 1, 1), nn.AdaptiveAvgPool2d(1))).double()
    ref = copy.deepcopy(m).train()
    R.sparsify(m, example_input=_EX)
    keep = torch.tensor([[[True, False], [True, True]], [[False, False], [False, True]]])
    mask = BlockMask(keep, 8, 16)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with R.block_mask(keep, 8):
        y_keep = m.train()(x)
    conv, bn = ref[0], ref[1]
    h = masked_conv2d_reference(x, conv.weight, conv.bias, mask=mask)
    h = masked_batch_norm_reference(h, mask.pixel_mask(1, h.shape[-2:]), bn.running_mean,
                                    bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps)
    h = masked_max_pool2d_reference(F.relu(h), 3, 1, 1, mask=mask)
    want = masked_avg_pool_reference(h, mask.pixel_mask(1, h.shape[-2:])).view(2, 4, 1, 1)
    torch.testing.assert_close(y_keep, want)
    torch.testing.assert_close(m[1].running_mean, bn.running_mean)
    m.eval()
    with R.block_mask(keep, 8):
        a = m(x)
    with R.block_mask(mask):  # the BlockMask form agrees
        torch.testing.assert_close(m(x), a)
    with pytest.raises(ValueError, match="BlockMask's image"), \
            R.block_mask(BlockMask(keep, 8, (16, 20))):
        m(x)  # a mask of another image size: checked at the first layer


def test_keep_grid_with_valid_and_ceil_mode_layers_matches_oracle(monkeypatch):
    """Convs after a padding-0 conv and after a ceil-mode pool (masked-dense on maps that are
    not image / stride; needs sparse_conv2d to accept any map size on that path)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                      nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.Conv2d(4, 4, 3, padding=1),
                      nn.AdaptiveAvgPool2d(1))
    R.sparsify(_randomize_bn(m).double(), example_input=_EX)
    oracle = copy.deepcopy(m)
    keep = torch.tensor([[[True, False], [True, True]]])
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    got = _run(m, x, keep, 8)
    with _force_dense(monkeypatch):
        want = _run(oracle, x, keep, 8)
    _assert_runs_close(got, want)


# ----------------------------------------------------------------------------- dense identity
class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x  # torchvision BasicBlock style, x dense (a ceil-mode pool ran masked-dense)
        return out.relu()


@pytest.mark.parametrize("train", [True, False])
def test_in_place_residual_add_of_a_dense_identity(monkeypatch, train):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.MaxPool2d(2, 2, ceil_mode=True), _Block(4),
                      nn.AdaptiveAvgPool2d(1))
    R.sparsify(_randomize_bn(m).double(), example_input=_EX)
    plan = R.tile_plan(m, 8, 16)
    assert plan["1"] == "masked-dense" and plan["2.conv"] == "tiles"
    oracle = copy.deepcopy(m)
    keep = torch.tensor([[[True, False], [True, True]], [[False, True], [False, False]]])
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the add runs on the tiles
        got = _run(m, x, keep, 8, train)
    with _force_dense(monkeypatch):
        want = _run(oracle, x, keep, 8, train)
    _assert_runs_close(got, want)


# ----------------------------------------------------------------------------- default trace input
def test_default_trace_input_when_a_head_conv_is_registered_first():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(8, 2, 1)  # registered first, runs last
            self.stem = nn.Conv2d(3, 8, 3, 2, 1)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.head(self.stem(x)))

    m = R.sparsify(Net())
    assert R.input_strides(m) == {"head": (2, 2), "stem": (1, 1), "pool": (2, 2)}


# ----------------------------------------------------------------------------- tile_plan
class _MixedAdd(nn.Module):
    """An out-of-place residual add of a packed map (a tiled conv) and a dense one (a ceil-mode
    pool, masked-dense): the sum is dense, so the global pool after it runs masked-dense."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, 1, 1)
        self.b = nn.Conv2d(4, 4, 3, 2, 1)
        self.mp = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        h = self.a(x)
        return self.pool(self.b(h) + self.mp(h))


def test_tile_plan_of_an_out_of_place_mixed_add():
    m = R.sparsify(_MixedAdd(), example_input=torch.zeros(1, 3, 16, 16))
    got = []
    h = m.pool.register_forward_pre_hook(lambda mod, a: got.append(type(a[0])))
    plan = R.tile_plan(m, 8, 16)
    assert plan == {"a": "tiles", "b": "tiles", "mp": "masked-dense", "pool": "masked-dense"}, plan
    with R.block_mask(torch.tensor([[[True, False], [False, True]]]), 8):
        m(torch.randn(1, 3, 16, 16))
    h.remove()
    assert got[-1] is not P.PackedMap  # the run agrees
    assert all(mod.training for mod in m.modules())  # tile_plan restored train mode


def test_tile_plan_bad_arguments():
    # were a ZeroDivisionError, torch.arange's "bound inconsistent with step sign" and a str // int
    m = R.sparsify(_MixedAdd(), example_input=torch.zeros(1, 3, 16, 16))
    for block, size, err, msg in ((0, 16, ValueError, "tile_plan: block_size must be at least 1"),
                                  (-4, 16, ValueError, "tile_plan: block_size must be at least 1"),
                                  (8.0, 16, TypeError, "tile_plan: block_size must be an int"),
                                  (8, "16", TypeError, "tile_plan: image_size must be an int or a pair"),
                                  (8, (16, 0), ValueError, "tile_plan: image_size must be positive")):
        with pytest.raises(err, match=msg):
            R.tile_plan(m, block, size)
    want = R.tile_plan(m, 8, 16)
    assert R.tile_plan(m, 8, (16, 16)) == want
    # NumPy ints, as BlockMask takes them (worked before the checks; as_pair took Python ints only)
    for size in ((np.int64(16), np.int64(16)), np.array([16, 16]), np.int32(16), torch.tensor(16)):
        assert R.tile_plan(m, np.int64(8), size) == want


@pytest.mark.parametrize("layers", [
    lambda: [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
             nn.BatchNorm2d(4)],  # after a padding-0 conv: BN and conv get dense 14x14 maps
    lambda: [nn.Conv2d(3, 4, 3, 1, 1), nn.MaxPool2d(2, 2, ceil_mode=True), _Block(4)],
    lambda: [nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4)],  # BN on the image
])
def test_tile_plan_follows_the_producer(layers):
    """BN after a masked-dense layer gets a dense map: tile_plan says so."""
    m = nn.Sequential(*layers(), nn.AdaptiveAvgPool2d(1))
    R.sparsify(m, example_input=torch.zeros(1, 3, 32, 32))
    plan = R.tile_plan(m, 8, 16)
    seen = {}
    hooks = [mod.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, type(o)))
             for n, mod in m.named_modules() if n in plan and not isinstance(mod, nn.AdaptiveAvgPool2d)]
    with R.block_mask(torch.tensor([[[True, False], [True, True]]]), 8):
        m(torch.randn(1, 3, 16, 16))
    for h in hooks:
        h.remove()
    assert seen and {n: t is P.PackedMap for n, t in seen.items()} == \
        {n: plan[n] == "tiles" for n in seen}, (plan, seen)


def test_layer_replaced_after_sparsify_raises_under_a_mask():
    # a BatchNorm replaced after sparsify (e.g. convert_sync_batchnorm without a second sparsify)
    # on a masked-dense layer ran unmasked, silently: it counted removed zeros as data
    import torchvision

    torch.manual_seed(0)
    m = R.sparsify(torchvision.models.resnet18(num_classes=4))
    x = torch.randn(2, 3, 64, 64)
    keep = torch.rand(2, 4, 4) < 0.5
    keep[:, 0, 0] = True
    assert R.tile_plan(m, 16, 64)["layer4.0.bn1"] == "masked-dense"
    m.layer4[0].bn1 = nn.BatchNorm2d(512)
    m(x)  # no mask: nothing to convert for
    with pytest.raises(RuntimeError, match=r"1 layer\(s\) were added or replaced after sparsify.*layer4\.0\.bn1"):
        with R.block_mask(keep, 16):
            m(x)
    R.sparsify(m)  # converted now: runs, and equals a model sparsified with that BN from the start
    ref = copy.deepcopy(m)
    with R.block_mask(keep, 16):
        torch.testing.assert_close(m(x), ref(x))
    assert len(m._forward_pre_hooks) == 1
    R.sparsify(m)  # no second hook
    assert len(m._forward_pre_hooks) == 1
    R.unsparsify(m)
    assert len(m._forward_pre_hooks) == 0


def _sparsified_one_sample(net, strides):
    """Sparsify ``net`` (float64) on a 16 px trace, its traced input strides being ``strides``;
    returns its untouched copy, a one-sample mask of 8 px blocks (one removed) and an input."""
    ref = copy.deepcopy(net)
    R.sparsify(net, example_input=_EX)
    assert R.input_strides(net) == strides
    mask = BlockMask(torch.tensor([[[True, False], [True, True]]]), 8, 16)
    return ref, mask, torch.randn(1, 3, 16, 16, dtype=torch.float64)


def test_stride_trace_of_a_conv_strided_on_one_axis():
    # a conv of stride (1, 2): every later layer sees the mask at input stride (1, 2) (audit 80:
    # a trace multiplying one axis's stride into the other gave (1, 1) and a silently other map)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, (1, 2), 1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, 1, 1)).double().eval()
    ref, mask, x = _sparsified_one_sample(net, {"0": (1, 1), "1": (1, 2), "3": (1, 2)})
    c0, bn, c3 = ref[0], ref[1], ref[3]
    y = masked_conv2d_reference(x, c0.weight, c0.bias, c0.stride, c0.padding, mask=mask)
    y = masked_batch_norm_reference(y, mask.pixel_mask((1, 2), y.shape[-2:]), bn.running_mean,
                                    bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps).relu()
    want = masked_conv2d_reference(y, c3.weight, c3.bias, c3.stride, c3.padding, mask=mask, in_stride=(1, 2))
    with R.block_mask(mask):
        got = P.as_dense(net(x))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_grouped_dilated_conv_and_dilated_pool_match_the_references():
    # groups and dilation are carried from the module into the masked conv / pool
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 1, 2, dilation=2, groups=2),
                        nn.MaxPool2d(3, 2, 1, dilation=2), nn.Conv2d(4, 4, 3, 1, 1)).double().eval()
    ref = copy.deepcopy(net)
    R.sparsify(net, example_input=_EX)
    keep = torch.tensor([[[True, False], [True, True]], [[False, True], [False, False]]])
    mask = BlockMask(keep, 8, 16)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    c0, c1, mp, c3 = ref
    y = masked_conv2d_reference(x, c0.weight, c0.bias, 1, 1, mask=mask)
    y = masked_conv2d_reference(y, c1.weight, c1.bias, 1, 2, 2, 2, mask=mask)
    y = masked_max_pool2d_reference(y, 3, 2, 1, 2, mask=mask)
    want = masked_conv2d_reference(y, c3.weight, c3.bias, 1, 1, mask=mask, in_stride=2)
    with R.block_mask(mask):
        got = P.as_dense(net(x))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bn_with_track_running_stats_turned_off_moves_no_buffer():
    # nn.BatchNorm2d with track_running_stats set False after construction: training uses the
    # batch statistics and leaves running_mean / running_var / num_batches_tracked untouched
    torch.manual_seed(0)
    net = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4))).double()
    dense = copy.deepcopy(net)
    R.sparsify(net, example_input=_EX)
    for m in (net, dense):
        m[1].track_running_stats = False
        m.train()
    before = _bn_state(net)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with R.block_mask(torch.ones(2, 2, 2, dtype=torch.bool), 8):
        got = P.as_dense(net(x))
    torch.testing.assert_close(got, dense(x))
    _assert_states_close(_bn_state(net), before, rtol=0, atol=0)


def test_max_pool_strided_on_one_axis():
    # a pool of stride (2, 1): later layers at input stride (2, 1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.MaxPool2d((2, 1), (2, 1)),
                        nn.Conv2d(4, 4, 3, 1, 1)).double().eval()
    ref, mask, x = _sparsified_one_sample(net, {"0": (1, 1), "1": (1, 1), "2": (2, 1)})
    c0, _, c2 = ref
    y = masked_conv2d_reference(x, c0.weight, c0.bias, 1, 1, mask=mask)
    y = masked_max_pool2d_reference(y, (2, 1), (2, 1), mask=mask)
    want = masked_conv2d_reference(y, c2.weight, c2.bias, 1, 1, mask=mask, in_stride=(2, 1))
    with R.block_mask(mask):
        got = P.as_dense(net(x))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_tile_plan_moves_no_running_statistic():
    m = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(1)))
    R.sparsify(m, example_input=torch.zeros(1, 3, 16, 16)).train()
    before = _bn_state(m)
    R.tile_plan(m, 8, 16)
    assert all(mod.training for mod in m.modules())
    _assert_states_close(_bn_state(m), before, rtol=0, atol=0)


def test_a_stride1_submodule_called_alone_takes_its_input_as_the_image():
    # Under a keep grid, a stride-1 layer that is not the model's first, run before any first
    # layer did (a submodule called on its own), takes its input's size as the image's
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 1, 1)).double().eval()
    ref = copy.deepcopy(net)
    R.sparsify(net, example_input=_EX)
    keep = torch.tensor([[[True, False], [True, True]], [[False, True], [False, False]]])
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    with R.block_mask(keep, 8):
        got = P.as_dense(net[1](x))
    want = masked_conv2d_reference(x, ref[1].weight, ref[1].bias, 1, 1, mask=BlockMask(keep, 8, 16))
    assert not torch.equal(want, torch.zeros_like(want))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_tile_plan_of_a_module_run_on_a_dense_then_a_packed_map():
    # one BatchNorm run twice per forward: on a map an add with a dense map left dense, then on
    # a packed one. tile_plan says masked-dense (not every call computes tiles only), not the
    # last call's answer (audit 97's r29)
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn, self.pool = nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            a = self.c(x)
            dense = self.bn(a + x.mean(1, keepdim=True))  # packed + dense: a dense map
            return self.pool(self.bn(a) + dense).flatten(1)

    m = R.sparsify(Twice(), example_input=torch.zeros(1, 3, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = R.tile_plan(m, 8, 16)
    assert plan["c"] == "tiles" and plan["bn"] == "masked-dense", plan
