"""sparsify / block_mask on torchvision and timm ResNets: the untouched model without a mask, and
the masked network of SEMANTICS.md section 2 with one, checked against a hand-written forward of
the same weights built from the reference functions (strides there are hard-coded by the
architecture, not taken from the converter's trace)."""
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effssl_kernels.masks import BlockMask
from effssl_kernels.nn import resnet as R
from effssl_kernels.sparse.packed import _UNKNOWN, PackedMap, _saved_tensors_hooks, as_dense, pack_map
from effssl_kernels.reference.masked_net import (
    masked_avg_pool_reference,
    masked_batch_norm_reference,
    masked_conv2d_reference,
    masked_max_pool2d_reference,
)

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


def _cifar_resnet(block=BasicBlock, layers=(1, 1, 1, 1), num_classes=10):
    """CIFAR variant: 3x3 stride-1 stem, no max pool."""
    m = ResNet(block, list(layers), num_classes=num_classes)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


def _randomize_bn(model, seed=1):
    """Non-trivial affine parameters and running statistics (where the BN has them), so a wrong
    BN path shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _keep(n, hb, wb, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.rand(n, hb, wb, generator=g) < p
    k[:, 0, 0] = True  # every sample keeps something
    k[0, -1, -1] = False  # and something is removed
    return k


# ----------------------------------------------------------------------------- the oracle
def _ref_conv(conv, x, mask, s):
    return masked_conv2d_reference(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                   conv.dilation, conv.groups, mask=mask, in_stride=s)


def _ref_bn(bn, x, mask, s):
    training = bn.training
    if training:
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum
    if momentum is None:  # the cumulative average: factor 1 / num_batches_tracked, as nn.BatchNorm2d
        momentum = 1.0 / float(bn.num_batches_tracked) if training else 0.0
    return masked_batch_norm_reference(x, mask.pixel_mask(s, x.shape[-2:]), bn.running_mean,
                                       bn.running_var, bn.weight, bn.bias, training, momentum, bn.eps)


def _ref_block(blk, x, mask, s):
    """torchvision BasicBlock / Bottleneck at input stride ``s``; returns (out, out stride)."""
    st = blk.stride
    if isinstance(blk, BasicBlock):
        out = F.relu(_ref_bn(blk.bn1, _ref_conv(blk.conv1, x, mask, s), mask, s * st))
        out = _ref_bn(blk.bn2, _ref_conv(blk.conv2, out, mask, s * st), mask, s * st)
    else:  # Bottleneck: stride on the 3x3 conv
        out = F.relu(_ref_bn(blk.bn1, _ref_conv(blk.conv1, x, mask, s), mask, s))
        out = F.relu(_ref_bn(blk.bn2, _ref_conv(blk.conv2, out, mask, s), mask, s * st))
        out = _ref_bn(blk.bn3, _ref_conv(blk.conv3, out, mask, s * st), mask, s * st)
    if blk.downsample is not None:
        idt = _ref_bn(blk.downsample[1], _ref_conv(blk.downsample[0], x, mask, s), mask, s * st)
    else:
        idt = x
    return F.relu(out + idt), s * st


def _ref_forward(model, x, mask, stem_stride, pool):
    """Masked forward of a torchvision ResNet from the reference functions."""
    s = 1
    x = _ref_conv(model.conv1, x, mask, s)
    s *= stem_stride
    x = F.relu(_ref_bn(model.bn1, x, mask, s))
    if pool:
        x = masked_max_pool2d_reference(x, 3, 2, 1, mask=mask, in_stride=s)
        s *= 2
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for blk in layer:
            x, s = _ref_block(blk, x, mask, s)
    x = masked_avg_pool_reference(x, mask.pixel_mask(s, x.shape[-2:]))
    return model.fc(x)


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k}


def _assert_states_close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------- no mask / all kept
@pytest.mark.parametrize("train", [True, False])
def test_no_mask_is_the_original(train):
    orig = _randomize_bn(torchvision.models.resnet18(num_classes=10))
    conv = R.sparsify(copy.deepcopy(orig))
    orig.train(train)
    conv.train(train)
    x = torch.randn(2, 3, 64, 64)
    with R.block_mask(None):
        y1 = conv(x)
    y0 = orig(x)
    assert torch.equal(y0, y1)
    _assert_states_close(_bn_state(orig), _bn_state(conv), rtol=0, atol=0)
    y0 = orig(x)
    y2 = conv(x)  # outside any with
    assert torch.equal(y0, y2)
    _assert_states_close(_bn_state(orig), _bn_state(conv), rtol=0, atol=0)


@pytest.mark.parametrize("train", [True, False])
def test_all_kept_equals_dense(train):
    orig = _randomize_bn(torchvision.models.resnet18(num_classes=10))
    conv = R.sparsify(copy.deepcopy(orig))
    orig.train(train)
    conv.train(train)
    x = torch.randn(2, 3, 64, 64)
    mask = BlockMask(torch.ones(2, 4, 4, dtype=torch.bool), 16, 64)
    with R.block_mask(mask):
        y1 = conv(x)
    y0 = orig(x)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4)
    _assert_states_close(_bn_state(orig), _bn_state(conv), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- against the oracle
def _check_against_reference(orig, x, keep, block, stem_stride, pool, train, ref=None, grad_atol=1e-10):
    """``ref``: a torchvision model the weights of ``orig`` load into, for ``_ref_forward``
    (default a copy of ``orig``, itself torchvision). ``grad_atol``: of the parameter gradients."""
    orig = _randomize_bn(orig).double()
    if ref is None:
        ref = copy.deepcopy(orig)
    else:
        ref.double().load_state_dict(orig.state_dict())
    conv = R.sparsify(copy.deepcopy(orig))
    ref.train(train)
    conv.train(train)
    mask = BlockMask(keep, block, x.shape[-2:])
    xr = x.clone().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    y_ref = _ref_forward(ref, xr, mask, stem_stride, pool)
    # Every 4-D map of the converted model (each layer, block, ReLU) is zero under removed
    # footprints (waxing); the stride is the size ratio here (sizes divide exactly).
    maps = []
    hooks = [m.register_forward_hook(lambda m, a, o: maps.append(o))
             for m in conv.modules() if m is not conv]
    with R.block_mask(keep, block):  # keep + block size: image size taken from x
        y = conv(xc)
    for h in hooks:
        h.remove()
    maps = [o for o in maps if isinstance(o, torch.Tensor) and o.dim() == 4]
    packed = sum(isinstance(o, PackedMap) for o in maps)
    assert packed > 10  # most maps stay packed between layers
    maps = [as_dense(o) for o in maps]
    checked = 0
    for o in maps:
        removed = ~mask.pixel_mask(x.shape[-1] // o.shape[-1], o.shape[-2:]).expand_as(o)
        assert torch.all(o[removed] == 0)
        checked += bool(removed.any())
    assert checked > 20
    dense = copy.deepcopy(orig).train(train)(x)
    assert not torch.allclose(y, dense, rtol=1e-3, atol=1e-3)  # the mask matters
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    _assert_states_close(_bn_state(ref), _bn_state(conv), rtol=1e-9, atol=1e-12)
    # Backward outside the with: the mask was captured at forward.
    g = torch.randn_like(y)
    (y_ref * g).sum().backward()
    (y * g).sum().backward()
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-8, atol=1e-10)
    pr, pc = dict(ref.named_parameters()), dict(conv.named_parameters())
    for k, p in pr.items():
        torch.testing.assert_close(pc[k].grad, p.grad, rtol=1e-8, atol=grad_atol,
                                   msg=lambda m, k=k: f"grad {k}: {m}")
    # Zero gradient under removed input blocks, nonzero somewhere kept.
    pm = mask.pixel_mask(1, x.shape[-2:]).expand_as(x)
    assert torch.all(xc.grad[~pm] == 0)
    assert xc.grad[pm].abs().sum() > 0
    return conv, mask


@pytest.mark.parametrize("train", [True, False])
def test_cifar_resnet_matches_reference(train):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _check_against_reference(_cifar_resnet(), x, _keep(2, 4, 4), 8, 1, False, train)


def test_bn_momentum_none_is_the_cumulative_average_over_kept_pixels():
    # nn.BatchNorm2d(momentum=None) averages the batches' statistics with factor
    # 1 / num_batches_tracked; an off-by-one there passed every other test (audit 78)
    orig = _randomize_bn(_cifar_resnet()).double()
    for m in orig.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    ref, conv = copy.deepcopy(orig).train(), R.sparsify(copy.deepcopy(orig)).train()
    g = torch.Generator().manual_seed(4)
    for step in range(3):
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=g)
        keep = _keep(2, 4, 4, seed=step)
        with torch.no_grad():
            _ref_forward(ref, x, BlockMask(keep, 8, 32), 1, False)
            with R.block_mask(keep, 8):
                conv(x)
        _assert_states_close(_bn_state(ref), _bn_state(conv), rtol=1e-9, atol=1e-12)
    assert conv.bn1.num_batches_tracked == 3


@pytest.mark.parametrize("train", [True, False])
def test_resnet18_matches_reference_block_not_dividing_strides(train):
    # block 16 on 64 px: layer4 (stride 32) is not tile-aligned and runs masked-dense. Seed 9's
    # keep removes stride-32 positions (seed 3's kept all, so layer4's BN and pool ran unmasked).
    x, keep = torch.randn(2, 3, 64, 64, dtype=torch.float64), _keep(2, 4, 4, seed=9)
    assert not BlockMask(keep, 16, 64).pixel_mask(32, (2, 2)).all()
    _check_against_reference(torchvision.models.resnet18(num_classes=5), x, keep, 16, 2, True, train)


@pytest.mark.parametrize("train", [True, False])
def test_timm_resnet50_matches_reference(train):
    # timm's own ResNet-50 modules (its Bottleneck, act layers, SelectAdaptivePool2d) converted,
    # against the reference forward of a torchvision ResNet-50 holding the same weights
    timm = pytest.importorskip("timm")
    # Seed 9 removes stride-32 positions: layer4's training BN sees 3 of 4 positions per sample,
    # and the reference's own conv1 gradient (|g| up to ~850) moves by 2e-9 under 1e-15 input
    # noise, so the gradients are compared to 1e-8 absolute (1e-11 of their largest).
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    _check_against_reference(timm.create_model("resnet50", num_classes=5), x, _keep(2, 4, 4, seed=9), 16, 2,
                             True, train, ref=torchvision.models.resnet50(num_classes=5), grad_atol=1e-8)


def test_bottleneck_resnet_matches_reference():
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    m = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5, width_per_group=16)
    _check_against_reference(m, x, _keep(2, 2, 2, p=0.6, seed=5), 32, 2, True, True)


def test_eval_uses_running_stats():
    orig = _randomize_bn(_cifar_resnet()).double().eval()
    conv = R.sparsify(copy.deepcopy(orig))
    before = _bn_state(conv)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    keep = _keep(2, 4, 4, seed=2)
    mask = BlockMask(keep, 8, 32)
    with R.block_mask(mask):
        y = conv(x)
    _assert_states_close(before, _bn_state(conv), rtol=0, atol=0)
    torch.testing.assert_close(y, _ref_forward(orig, x, mask, 1, False), rtol=1e-9, atol=1e-9)
    # A batch of one sample gives the same per-sample output as in the batch of two (no batch stats).
    with R.block_mask(BlockMask(keep[:1], 8, 32)):
        y1 = conv(x[:1])
    torch.testing.assert_close(y1, y[:1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("size", [64, 70])  # 64: tiled layers; 70: every layer masked-dense
def test_a_mask_evaluated_in_inference_mode_then_trains(size):
    # The mask's cached kept list, tile tables and pixel masks were built as inference tensors
    # on an evaluation under torch.inference_mode(), so the next training step with the same
    # mask failed ("Inference tensors cannot be saved for backward").
    model = R.sparsify(torchvision.models.resnet18(num_classes=4))
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():  # a mask made there too (its keep had no version counter)
        mask = BlockMask(_keep(2, 2, 2, seed=4), 32, size)
    model.eval()
    with torch.inference_mode(), R.block_mask(mask):
        model(x)
    with torch.inference_mode(), R.block_mask(_keep(2, 2, 2, seed=4), 32):
        model(x)
    model.train()
    with R.block_mask(mask):
        model(x).sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    with torch.inference_mode():  # and the other way round: cached tensors serve inference too
        with R.block_mask(mask):
            model.eval()(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_torchscript_refused_with_a_clear_error():
    # jit.trace under a mask crashed in an assertion (tiled layers) or recorded the mask as
    # constants (masked-dense layers, as export did); jit.script failed on an annotation.
    model = R.sparsify(torchvision.models.resnet18(num_classes=4)).eval()
    keep = _keep(2, 2, 2, seed=4)
    for size in (64, 70):  # 64: tiled layers; 70: every layer masked-dense
        x = torch.randn(2, 3, size, size)
        with R.block_mask(keep, 32), pytest.raises(RuntimeError, match="torch.jit.trace"):
            torch.jit.trace(model, x, check_trace=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(torch.jit.trace(model, x)(x), model(x))  # no mask: the dense model
        with pytest.raises(TypeError, match="unsparsify"):
            torch.jit.script(model)
        scripted = torch.jit.script(R.unsparsify(copy.deepcopy(model)))
        assert torch.equal(scripted(x), model(x))


def test_removed_everywhere_in_a_sample_is_finite():
    conv = R.sparsify(_cifar_resnet()).train()
    keep = _keep(2, 4, 4)
    keep[1] = False
    with R.block_mask(keep, 8):
        y = conv(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(y).all()
    # Nothing of sample 1 survives: its output is the fc bias alone.
    torch.testing.assert_close(y[1], conv.fc.bias.detach())


# ----------------------------------------------------------------------------- conversion
def test_state_dict_and_round_trip():
    orig = torchvision.models.resnet18(num_classes=10)
    classes = {n: type(m) for n, m in orig.named_modules()}
    conv = R.sparsify(copy.deepcopy(orig))
    assert R.is_sparse(conv) and not R.is_sparse(orig)
    assert list(conv.state_dict().keys()) == list(orig.state_dict().keys())
    assert isinstance(conv.conv1, nn.Conv2d) and type(conv.conv1) is not nn.Conv2d
    assert R.sparsify(conv) is conv  # idempotent
    dup = copy.deepcopy(conv)  # a momentum encoder keeps the conversion
    assert R.is_sparse(dup) and R.input_strides(dup) == R.input_strides(conv)
    R.unsparsify(conv)
    assert {n: type(m) for n, m in conv.named_modules()} == classes
    assert R.input_strides(conv) == {}
    x = torch.randn(2, 3, 64, 64)
    orig.eval()
    conv.eval()
    with R.block_mask(BlockMask(_keep(2, 4, 4), 16, 64)):  # ignored by the restored model
        assert torch.equal(conv(x), orig(x))
    with pytest.raises(TypeError):
        R.unsparsify(conv)


def test_sparsify_does_not_touch_running_stats_or_mode():
    m = _randomize_bn(torchvision.models.resnet18(num_classes=10)).train()
    before = _bn_state(m)
    R.sparsify(m)
    assert m.training and all(x.training for x in m.modules())
    _assert_states_close(before, _bn_state(m), rtol=0, atol=0)


def _resnet_strides(names_to_stride, table):
    for name, s in names_to_stride.items():
        assert table[name] == (s, s), (name, table[name], s)


def test_stride_table_resnet18():
    t = R.input_strides(R.sparsify(torchvision.models.resnet18()))
    _resnet_strides({"conv1": 1, "bn1": 2, "maxpool": 2, "layer1.0.conv1": 4, "layer1.1.bn2": 4,
                     "layer2.0.conv1": 4, "layer2.0.bn1": 8, "layer2.0.conv2": 8,
                     "layer2.0.downsample.0": 4, "layer2.0.downsample.1": 8,
                     "layer3.0.downsample.0": 8, "layer4.0.conv1": 16, "layer4.0.conv2": 32,
                     "layer4.1.bn2": 32, "avgpool": 32}, t)
    assert len(t) == 20 + 20 + 2  # 20 convs, 20 BNs, maxpool, avgpool


def test_stride_table_resnet50():
    t = R.input_strides(R.sparsify(torchvision.models.resnet50()))
    _resnet_strides({"conv1": 1, "maxpool": 2, "layer1.0.conv1": 4, "layer1.0.downsample.0": 4,
                     "layer2.0.conv1": 4, "layer2.0.bn1": 4, "layer2.0.conv2": 4,
                     "layer2.0.bn2": 8, "layer2.0.conv3": 8, "layer2.0.downsample.0": 4,
                     "layer2.1.conv1": 8, "layer4.0.conv2": 16, "layer4.0.conv3": 32,
                     "layer4.2.bn3": 32, "avgpool": 32}, t)


def test_stride_table_cifar():
    t = R.input_strides(R.sparsify(_cifar_resnet()))
    assert "maxpool" not in t  # nn.Identity: nothing to swap
    _resnet_strides({"conv1": 1, "bn1": 1, "layer1.0.conv1": 1, "layer2.0.conv1": 1,
                     "layer2.0.conv2": 2, "layer3.0.conv2": 4, "layer4.0.conv2": 8,
                     "layer4.0.downsample.0": 4, "avgpool": 8}, t)


def test_stride_is_a_product_not_a_size_ratio():
    # A valid 3x3 conv shrinks the map without changing the stride.
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, 2, 1),
                      nn.MaxPool2d(2), nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1))
    t = R.input_strides(R.sparsify(m, example_input=torch.zeros(1, 3, 20, 20)))
    assert t == {"0": (1, 1), "1": (1, 1), "2": (1, 1), "3": (2, 2), "4": (4, 4), "5": (4, 4)}


def test_timm_resnets():
    timm = pytest.importorskip("timm")
    m50 = timm.create_model("resnet50", pretrained=False, num_classes=10)
    t = R.input_strides(R.sparsify(m50))
    _resnet_strides({"conv1": 1, "maxpool": 2, "layer2.0.conv2": 4, "layer2.0.conv3": 8,
                     "layer2.0.downsample.0": 4, "layer4.2.bn3": 32, "global_pool.pool": 32}, t)
    orig = _randomize_bn(timm.create_model("resnet18", pretrained=False, num_classes=10)).train()
    conv = R.sparsify(copy.deepcopy(orig))
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(conv(x), orig(x))
    with R.block_mask(torch.ones(2, 4, 4, dtype=torch.bool), 16):
        y = conv(x)
    torch.testing.assert_close(y, orig(x), rtol=1e-4, atol=1e-4)
    # The masked timm model equals the masked torchvision model with the same weights.
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(orig.state_dict())
    R.sparsify(tv)
    keep = _keep(2, 4, 4, seed=7)
    conv.eval()
    tv.eval()
    with R.block_mask(keep, 16):
        torch.testing.assert_close(conv(x), tv(x), rtol=1e-5, atol=1e-5)


def test_timm_grad_checkpointing():
    # timm's own set_grad_checkpointing (non-reentrant checkpoint per stage) on a model whose
    # layer4 runs masked-dense at 64 px / block 16: same outputs and gradients as without
    timm = pytest.importorskip("timm")
    orig = _randomize_bn(timm.create_model("resnet18", pretrained=False, num_classes=10)).double().eval()
    a, b = R.sparsify(copy.deepcopy(orig)), R.sparsify(copy.deepcopy(orig))
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with R.block_mask(_keep(2, 4, 4, seed=6), 16):
        ya, yb = a(x), b(x)
        ya.sum().backward()
        yb.sum().backward()
    torch.testing.assert_close(yb, ya)
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=lambda m, k=k: f"{k}: {m}")


def test_timm_fast_avg_pool():
    timm = pytest.importorskip("timm")
    m = timm.create_model("resnet18", pretrained=False, num_classes=4, global_pool="fast")
    m = _randomize_bn(m).double().eval()
    orig = copy.deepcopy(m)
    R.sparsify(m)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert torch.equal(m(x), orig(x))
    with R.block_mask(torch.ones(2, 2, 2, dtype=torch.bool), 32):
        torch.testing.assert_close(m(x), orig(x))


# ----------------------------------------------------------------------------- per-call state
def test_nested_and_keep_equals_blockmask():
    conv = R.sparsify(_cifar_resnet()).eval()
    x = torch.randn(2, 3, 32, 32)
    keep = _keep(2, 4, 4, seed=4)
    with R.block_mask(BlockMask(keep, 8, 32)):
        a = conv(x)
        with R.block_mask(None):
            d = conv(x)
        b = conv(x)
    with R.block_mask(keep, 8):
        c = conv(x)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(d, conv(x))
    assert not torch.allclose(a, d)


def test_every_conv_goes_through_conv2d_map(monkeypatch):
    calls = []
    real = R.conv2d_map

    def spy(*a, **k):
        calls.append(k["in_stride"])
        return real(*a, **k)

    monkeypatch.setattr(R, "conv2d_map", spy)
    conv = R.sparsify(_cifar_resnet())
    with R.block_mask(_keep(2, 4, 4), 8):
        conv(torch.randn(2, 3, 32, 32))
    assert len(calls) == 12 and sorted(set(calls)) == [(1, 1), (2, 2), (4, 4), (8, 8)]
    conv(torch.randn(2, 3, 32, 32))  # no mask: the original forward
    assert len(calls) == 12


# block 8 tiles every stage; block 4 runs the late stages masked-dense, where a stage's
# packed input is unpacked inside the checkpoint (its cached dense copy must not serve the
# recomputation: a different count of saved tensors is a CheckpointError). "torch_equal" and
# "torch_equal_mask": plain per-stage checkpoints with backward inside the `with` of an equal but
# new keep / BlockMask (until 2026-12-06 a ValueError, the keep's image size unknown to a stage
# recomputed alone, and a CheckpointError, the forward's maps repacked under the new index).
# Block 2: layer4's input (stride 4) is dense, so a keep's image size comes from the layer's
# forward, not from a packed input (a ValueError under "torch_equal" until 2026-12-06).
@pytest.mark.parametrize("block", [8, 4, 2])
@pytest.mark.parametrize("ckpt", ["ours", "torch", "torch_equal", "torch_equal_mask"])
def test_checkpoint_recomputes_under_the_forward_mask(block, ckpt):
    orig = _randomize_bn(_cifar_resnet()).double().eval()
    a = R.sparsify(copy.deepcopy(orig))
    b = R.sparsify(copy.deepcopy(orig))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    keep = _keep(2, 32 // block, 32 // block, seed=6)
    if ckpt == "ours":
        cp = R.checkpoint
    else:  # plain checkpoint: recomputes under the mask only with backward inside a with
        def cp(f, z):
            return torch.utils.checkpoint.checkpoint(f, z, use_reentrant=False)

    def stages(m, x, ckpt):
        x = m.relu(m.bn1(m.conv1(x)))
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            x = ckpt(layer, x) if ckpt else layer(x)
        return m.fc(torch.flatten(m.avgpool(x), 1))

    mask = BlockMask(keep, block, (32, 32)) if ckpt == "torch_equal_mask" else keep
    with R.block_mask(mask, None if ckpt == "torch_equal_mask" else block):
        ya = stages(a, x, None)
        yb = stages(b, x, cp)
        torch.testing.assert_close(yb, ya)
        if ckpt == "torch":
            ya.sum().backward()
            yb.sum().backward()
    if ckpt == "ours":
        ya.sum().backward()  # outside the with: the checkpoint recomputes under the same mask
        yb.sum().backward()
    elif ckpt == "torch_equal":
        ya.sum().backward()
        with R.block_mask(keep.clone(), block):
            yb.sum().backward()
    elif ckpt == "torch_equal_mask":
        ya.sum().backward()
        with R.block_mask(BlockMask(keep.clone(), block, (32, 32))):
            yb.sum().backward()
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=lambda m, k=k: f"{k}: {m}")


# Without the saved-tensors hooks query (torch 2.7 and older) the guard notes every grad-mode
# forward, as before 2026-12-06: a dense second view hides a masked checkpointed call there, and
# plain per-stage checkpoints of several views or image sizes need masked_checkpoint there (the
# note is per module, so the last view's keep or image size wins).
_HOOKS_QUERY = pytest.mark.skipif(_saved_tensors_hooks() is _UNKNOWN, reason="this torch cannot name the saved-tensors hooks")


@_HOOKS_QUERY
def test_per_stage_checkpoint_of_two_image_sizes_each_under_an_equal_keep():
    # Multi-crop: a global and a local view, each checkpointed per stage under its own keep, then
    # each backward inside an equal new keep. The image size a stage with a dense input takes
    # is its own forward's, noted per checkpoint (one per module took the last view's: the
    # global view's backward failed on the local view's size).
    import pickle

    torch.manual_seed(0)
    orig = _randomize_bn(_cifar_resnet()).double().eval()
    a, b = R.sparsify(copy.deepcopy(orig)), R.sparsify(copy.deepcopy(orig))

    def stages(m, x, ckpt):
        x = m.relu(m.bn1(m.conv1(x)))
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False) if ckpt else layer(x)
        return m.fc(torch.flatten(m.avgpool(x), 1))

    xg, xl = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    kg, kl = _keep(2, 16, 16, seed=1), _keep(2, 8, 8, seed=2)  # block 2: layer4's input is dense
    for m, ckpt in ((a, False), (b, True)):
        with R.block_mask(kg, 2):
            yg = stages(m, xg, ckpt)
        with R.block_mask(kl, 2):
            yl = stages(m, xl, ckpt)
        if ckpt:
            pickle.loads(pickle.dumps(m))  # the notes a checkpointed forward leaves copy too
        with R.block_mask(kg.clone(), 2):
            yg.sum().backward()
        with R.block_mask(kl.clone(), 2):
            (2 * yl.sum()).backward()
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("ckpt", [pytest.param("torch", marks=_HOOKS_QUERY), "ours"])
def test_per_stage_checkpoint_of_two_image_sizes_under_one_keep(ckpt):
    # One keep serves 32 and 33 px (a 16x16 grid at block 2): both views checkpointed per stage
    # in one `with`, backward inside it. The recomputed layer4 (dense input) took the mask of the
    # last view's size, not its own (a CheckpointError until 2026-12-06, masked_checkpoint too).
    torch.manual_seed(0)
    orig = _randomize_bn(_cifar_resnet()).double().eval()
    a, b = R.sparsify(copy.deepcopy(orig)), R.sparsify(copy.deepcopy(orig))
    cp = R.checkpoint if ckpt == "ours" else (
        lambda f, z: torch.utils.checkpoint.checkpoint(f, z, use_reentrant=False))

    def stages(m, x, checkpointed):
        x = m.relu(m.bn1(m.conv1(x)))
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            x = cp(layer, x) if checkpointed else layer(x)
        return m.fc(torch.flatten(m.avgpool(x), 1))

    x1, x2 = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(2, 3, 33, 33, dtype=torch.float64)
    keep = _keep(2, 16, 16, seed=1)
    for m, checkpointed in ((a, False), (b, True)):
        with R.block_mask(keep, 2):
            (stages(m, x1, checkpointed).sum() + 2 * stages(m, x2, checkpointed).sum()).backward()
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=lambda m, k=k: f"{k}: {m}")


def test_training_two_image_sizes_under_one_keep():
    # Train mode, one keep for 32 and 33 px: the 32 px view's BN runs packed (F.batch_norm saves
    # the running statistics), the 33 px view's masked-dense, whose in-place update of the same
    # buffers failed the first view's backward ("modified by an inplace operation") until
    # 2026-12-06. Both views' backward at once equals each view's backward on its own.
    torch.manual_seed(0)
    orig = _randomize_bn(_cifar_resnet()).double().train()
    a, b = R.sparsify(copy.deepcopy(orig)), R.sparsify(copy.deepcopy(orig))
    x1, x2 = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(2, 3, 33, 33, dtype=torch.float64)
    keep = _keep(2, 16, 16, seed=1)
    with R.block_mask(keep, 2):
        a(x1).sum().backward()
        (2 * a(x2).sum()).backward()
        (b(x1).sum() + 2 * b(x2).sum()).backward()
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=lambda m, k=k: f"{k}: {m}")
    for (k, ba), bb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(bb, ba, msg=lambda m, k=k: f"{k}: {m}")
    assert not torch.equal(a.bn1.running_mean, orig.bn1.running_mean)  # both views updated them


@pytest.mark.parametrize("reentrant", [True, False])
def test_plain_checkpoint_recomputed_outside_the_with_is_refused(reentrant):
    # backward after the with: a plain checkpoint recomputes unmasked; with use_reentrant=True
    # that was silently the dense layers' gradients. Now a clear error names masked_checkpoint.
    m = R.sparsify(_randomize_bn(_cifar_resnet()).eval())
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with R.block_mask(_keep(2, 4, 4, seed=3), 8):
        y = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match="masked_checkpoint"):
        y.sum().backward()
    # a model checkpointed unmasked recomputes unmasked: fine
    y = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("reentrant", [True, False])
def test_plain_checkpoint_recomputed_under_another_mask_is_refused(reentrant):
    # Backward inside another view's `with` (same tile count: checkpoint's shape check passes)
    # recomputed the first view's layers on the second view's tiles, silently.
    m = R.sparsify(_randomize_bn(_cifar_resnet()).double())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    k1 = _keep(2, 4, 4, seed=3)
    with R.block_mask(k1, 8):
        y = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
    with R.block_mask(k1.flip(-1), 8):
        with pytest.raises(RuntimeError, match="under a different block_mask .*masked_checkpoint"):
            y.sum().backward()
    # Both checkpointed: each recomputation is compared with its own forward (the checkpoint's
    # frame, or a reentrant one's ctx; without the hooks query, torch <= 2.7, a non-reentrant
    # checkpoint falls back to the module's last forward, which the first view then matches).
    if reentrant or _saved_tensors_hooks() is not _UNKNOWN:
        with R.block_mask(k1, 8):
            y1 = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
        with R.block_mask(k1.flip(-1), 8):
            y2 = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
            with pytest.raises(RuntimeError, match="under a different block_mask"):
                (y1 + y2).sum().backward()
        # each backward inside its own forward's `with`: fine
        x.grad = None
        with R.block_mask(k1, 8):
            y1 = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
        with R.block_mask(k1.flip(-1), 8):
            y2 = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
        with R.block_mask(k1, 8):
            y1.sum().backward()
        with R.block_mask(k1.flip(-1), 8):
            y2.sum().backward()
    # the same keep entered again recomputes as the forward ran: fine (compared by value)
    with R.block_mask(k1, 8):
        y = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
    with R.block_mask(k1.clone(), 8):
        y.sum().backward()
    # a dense checkpointed forward recomputed under a mask: refused too
    x.grad = None
    y = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
    with R.block_mask(k1, 8):
        with pytest.raises(RuntimeError, match="ran without a block_mask and is recomputed during backward under a block_mask"):
            y.sum().backward()


@pytest.mark.parametrize("reentrant", [True, False])
def test_two_checkpointed_calls_masked_first(reentrant):
    # A masked then a dense checkpointed call of one module, backward outside the `with`: the
    # module's note said "dense" (the last call), so a reentrant checkpoint recomputed the
    # masked call dense, silently. Each recomputation now meets its own checkpoint's note.
    m = R.sparsify(_randomize_bn(_cifar_resnet()).double())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    with R.block_mask(_keep(2, 4, 4, seed=3), 8):
        a = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
    b = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
    ours = "ran under a block_mask and is recomputed during backward under no"
    if not reentrant and _saved_tensors_hooks() is _UNKNOWN:
        # torch <= 2.7: no checkpoint to key by; torch's own check refuses the tile-count change
        ours += "|A different number of tensors was saved"
    with pytest.raises(RuntimeError, match=ours):
        (a.sum() + b.sum()).backward()


def _offloaded(offload):
    """Activation offloading around the step (FSDP's offload_wrapper uses save_on_cpu): a
    saved-tensors hook that saves, never recomputes."""
    return torch.autograd.graph.save_on_cpu() if offload else contextlib.nullcontext()


@_HOOKS_QUERY
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("between", ["no_grad logging pass", "dense second view"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_plain_checkpoint_refused_after_another_call_of_the_module(reentrant, between, offload):
    # The guard noted each module's last forward: an unmasked call between the masked
    # checkpointed one and backward hid it, and a reentrant checkpoint then gave the dense
    # layers' gradients silently. Calls backward never recomputes no longer change the note.
    m = R.sparsify(_randomize_bn(_cifar_resnet()).double())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    with _offloaded(offload):
        with R.block_mask(_keep(2, 4, 4, seed=3), 8):
            y = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
        if between == "no_grad logging pass":
            with torch.no_grad():
                m.eval()(x)
                m.train()
        else:
            y = y + m(x)
    with pytest.raises(RuntimeError, match="masked_checkpoint"):
        y.sum().backward()


@_HOOKS_QUERY
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("reentrant", [True, False])
def test_plain_checkpoint_of_a_dense_call_then_a_masked_call(reentrant, offload):
    # The other way round: a dense call checkpointed, then a plain masked call of the same
    # module, backward outside the `with`: the recomputation is dense as its forward was (this
    # was refused while the guard noted the module's last forward of any kind).
    orig = _randomize_bn(_cifar_resnet()).double()
    m = R.sparsify(copy.deepcopy(orig))
    x1, x2 = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x1.requires_grad_()
    keep = _keep(2, 4, 4, seed=5)
    with _offloaded(offload):
        a = torch.utils.checkpoint.checkpoint(m, x1, use_reentrant=reentrant)
        with R.block_mask(keep, 8):
            b = m(x2)
    (a.square().sum() + b.square().sum()).backward()
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    a = m(x1)
    with R.block_mask(keep, 8):
        b = m(x2)
    (a.square().sum() + b.square().sum()).backward()
    for g, p in zip(got, m.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("reentrant", [False, True])
def test_masked_checkpoint_of_a_dense_call_then_a_masked_call(reentrant):
    # The module's last forward (masked, outside the checkpoint) is not what the checkpointed
    # dense call did: its recomputation under masked_checkpoint must not be refused.
    m = R.sparsify(_randomize_bn(_cifar_resnet()).double().eval())
    x1, x2 = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x1.requires_grad_()  # a reentrant checkpoint computes no parameter gradient otherwise
    keep = _keep(2, 4, 4, seed=5)

    def step(ckpt):
        m.zero_grad()
        a = R.checkpoint(m, x1, use_reentrant=reentrant) if ckpt else m(x1)
        with R.block_mask(keep, 8):
            b = m(x2)
        (a.square().sum() + b.square().sum()).backward()
        return [p.grad.clone() for p in m.parameters()]

    for g, want in zip(step(True), step(False)):
        torch.testing.assert_close(g, want)


def test_mirror_is_cleared_when_threads_exit_out_of_order():
    # Thread A enters block_mask, B enters, A exits, B exits: no mask may stay in the mirror
    # (compiled code on torch < 2.14 reads it; eager code warned "in force in another thread").
    import threading

    from effssl_kernels.nn._state import ContextState

    state = ContextState("test_state", "test")
    steps = [threading.Event() for _ in range(4)]
    seen = []

    def a():
        with state.bound("mask A"):
            steps[0].set()
            steps[1].wait()
        steps[2].set()

    def b():
        steps[0].wait()
        with state.bound("mask B"):
            steps[1].set()
            steps[2].wait()
            seen.append(state.mirror)  # A has left: B's mask is the one in force
        steps[3].set()

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert steps[3].is_set() and seen == ["mask B"]
    assert state.mirror is None and state._active == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in force anywhere: no "another thread" warning
        assert state.get() is None


def test_checkpoint_refuses_reentrant_on_a_packed_map():
    # use_reentrant=True hands autograd the tiles' shape for the dense one: refused, clearly
    m = R.sparsify(_cifar_resnet())
    with R.block_mask(_keep(2, 4, 4), 8):
        x = m.relu(m.bn1(m.conv1(torch.randn(2, 3, 32, 32, requires_grad=True))))
        with pytest.raises(ValueError, match="use_reentrant=True"):
            R.checkpoint(m.layer1, x, use_reentrant=True)


def test_autocast_bfloat16_cpu():
    m = _randomize_bn(_cifar_resnet()).eval()
    R.sparsify(m)
    x = torch.randn(2, 3, 32, 32)
    keep = _keep(2, 4, 4, seed=8)
    with R.block_mask(keep, 8):
        y32 = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = m(x)
    assert torch.isfinite(y16).all()
    torch.testing.assert_close(y16.float(), y32, rtol=0.1, atol=0.1)


def test_sync_batch_norm_without_process_group_is_masked_bn():
    # Cross-rank statistics are tested in test_sparsify_ddp.py; on one process (no process
    # group) a SyncBatchNorm equals BatchNorm2d.
    bn = _randomize_bn(_cifar_resnet()).double().train()
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(bn))
    assert any(type(m) is nn.SyncBatchNorm for m in sync.modules())
    R.sparsify(bn)
    R.sparsify(sync)
    assert any(isinstance(m, nn.SyncBatchNorm) and type(m) is not nn.SyncBatchNorm
               for m in sync.modules())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with R.block_mask(_keep(2, 4, 4, seed=9), 8):
        torch.testing.assert_close(sync(x), bn(x))
    _assert_states_close(_bn_state(bn), _bn_state(sync), rtol=0, atol=0)


def test_backbone_with_projector_head():
    # A SimSiam-style encoder: the BatchNorm1d / Linear head after the pool stays untouched.
    net = _cifar_resnet()
    net.fc = nn.Identity()
    enc = nn.Sequential(net, nn.Linear(512, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))
    R.sparsify(enc)
    assert type(enc[2]) is nn.BatchNorm1d
    x = torch.randn(2, 3, 32, 32)
    with R.block_mask(_keep(2, 4, 4), 8):
        y = enc(x)
    y.sum().backward()
    assert y.shape == (2, 8) and torch.isfinite(y).all()
    assert net.conv1.weight.grad.abs().sum() > 0


def test_keep_ratio_for_logging():
    mask = BlockMask(_keep(2, 4, 4), 8, 32)
    assert float(mask.keep_ratio()) == pytest.approx(mask.keep.float().mean().item())


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    conv = R.sparsify(_cifar_resnet()).eval()
    x = torch.randn(2, 3, 32, 32)
    # the layer's class named (the module's check, before the op's own "sparse conv2d")
    with pytest.raises(ValueError, match="sparse Conv2d: mask batch 3 does not match x batch 2"), \
            R.block_mask(_keep(3, 4, 4), 8):
        conv(x)
    with pytest.raises(ValueError, match="grid"), R.block_mask(_keep(2, 3, 3), 8):
        conv(x)
    with pytest.raises(ValueError, match="image"), R.block_mask(BlockMask(_keep(2, 2, 2), 8, 16)):
        conv(x)  # a BlockMask of another image size
    with pytest.raises(ValueError, match="positive"), R.block_mask(_keep(2, 4, 4), 0):
        pass
    for bad in (True, 8.0):  # True would be block 1, 8.0 silently 8
        with pytest.raises(TypeError, match="block_size must be an int"), R.block_mask(_keep(2, 4, 4), bad):
            pass
    with pytest.raises(ValueError, match="block_size"), R.block_mask(_keep(2, 4, 4)):
        pass
    with pytest.raises(ValueError, match="differs"), \
            R.block_mask(BlockMask(_keep(2, 4, 4), 8, 32), 4):
        pass
    with pytest.raises(TypeError, match="bool"), R.block_mask(torch.ones(2, 4, 4), 8):
        pass
    with pytest.raises(TypeError), R.block_mask([[True]], 8):
        pass
    meta = _keep(2, 4, 4).to("meta")  # no values to build the tile lists from
    with pytest.raises(ValueError, match="meta device"), R.block_mask(meta, 8):
        pass
    with pytest.raises(ValueError, match="meta device"), R.block_mask(BlockMask(meta, 8, 32)):
        pass


def test_unsupported_layers_raise_at_sparsify():
    m = _cifar_resnet()
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode"):
        R.sparsify(m)
    assert not R.is_sparse(m)  # nothing swapped on failure
    # refused by type when planning, named (the stride trace would refuse their functions too,
    # with advice for functions: use the module form)
    for layer in (nn.AvgPool2d(2), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4), nn.Upsample(scale_factor=2),
                  nn.PixelShuffle(2), nn.ConvTranspose2d(4, 4, 2, 2)):
        name = type(layer).__name__
        with pytest.raises(TypeError, match=rf"sparsify: 1 \({name}\): not supported by the masked"):
            R.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3), layer))
    for size in (2, (1, None), (None, 1)):  # None keeps that side: not a global pool
        with pytest.raises(TypeError, match="global"):
            R.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(size)))

    class TwoStrides(nn.Module):  # 16 x 16 maps at strides 2 and 1 (a padding-0 17 x 17 conv)
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(3, 4, 17)

        def forward(self, x):
            return self.a(x) + self.b(x)

    with pytest.raises(TypeError, match=r"combines maps of strides \[\(1, 1\), \(2, 2\)\]"):
        R.sparsify(TwoStrides(), example_input=torch.zeros(1, 3, 32, 32))
    class Resample(nn.Module):  # a resampling op the converter cannot see as a module
        def forward(self, x):
            return F.interpolate(x, scale_factor=0.5)

    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Resample(), nn.Conv2d(4, 4, 3))
    with pytest.raises(TypeError, match="interpolate is a layer function"):
        R.sparsify(m)
    assert not R.is_sparse(m)

    class CropRows(nn.Module):  # the height alone changes: the map no longer lines up with the mask
        def forward(self, x):
            return x[:, :, 1:]

    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), CropRows(), nn.Conv2d(4, 4, 3))
    with pytest.raises(TypeError, match=r"changes the spatial size \(32, 32\) -> \(31, 32\)"):
        R.sparsify(m, example_input=torch.zeros(1, 3, 32, 32))

    class Subsample(nn.Module):  # any other op that changes the map's size
        def forward(self, x):
            return x[:, :, ::2, ::2]

    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Subsample(), nn.Conv2d(4, 4, 3))
    with pytest.raises(TypeError, match="spatial size"):
        R.sparsify(m)
    assert not R.is_sparse(m)


@pytest.mark.parametrize("where", ["layer2", "layer1.0.conv1", "maxpool_free_stem"])
def test_full_backward_hooks_on_masked_modules(where):
    """A module's full backward hook views its inputs and outputs with view_as: that of a packed
    map is a packed map of the same tiles (it was a dense tensor grafted onto the tiles' graph,
    and backward failed). The hook sees the tiles' gradients."""
    torch.manual_seed(0)
    model = R.sparsify(_randomize_bn(_cifar_resnet()).double())
    hooked = copy.deepcopy(model)
    name = "conv1" if where == "maxpool_free_stem" else where
    seen = []
    hooked.get_submodule(name).register_full_backward_hook(
        lambda mod, gin, gout: seen.append(gout[0].shape))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    keep = _keep(2, 4, 4)
    for m in (model, hooked):
        with R.block_mask(keep, 8):
            m(x).square().sum().backward()
    assert seen and seen[0][0] == int(keep.sum())  # [T, C, b, b]: the kept tiles' gradient
    for (k, a), b in zip(model.named_parameters(), hooked.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_parametrized_layers_sparsify_and_unsparsify():
    """torch's parametrize (weight_norm) makes a Parametrized<cls> with no forward of its own:
    sparsify takes it (it refused it as a subclass with its own forward), and unsparsify keeps
    a parametrization added after sparsify (it restored plain Conv2d, which has no weight then)."""
    from torch.nn.utils import parametrizations, parametrize

    torch.manual_seed(0)
    base = _randomize_bn(_cifar_resnet()).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    keep = _keep(2, 4, 4)
    # before sparsify: the same as the materialised weight under the mask
    a, b = copy.deepcopy(base), copy.deepcopy(base)  # (a deepcopy of a parametrized module
    for m in (a, b):                                  # shares its class, which removal edits)
        parametrizations.weight_norm(m.layer1[0].conv1)
    parametrize.remove_parametrizations(b.layer1[0].conv1, "weight", leave_parametrized=True)
    R.sparsify(a)
    R.sparsify(b)
    assert parametrize.is_parametrized(a.layer1[0].conv1) and R._is_swapped(a.layer1[0].conv1)
    with R.block_mask(keep, 8):
        ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    ya.sum().backward()
    assert a.layer1[0].conv1.parametrizations.weight.original0.grad is not None
    # after sparsify, then unsparsify: the parametrized dense layer again
    c = R.sparsify(copy.deepcopy(base))
    parametrizations.weight_norm(c.layer2[0].conv2)
    R.unsparsify(c)
    conv = c.layer2[0].conv2
    assert parametrize.is_parametrized(conv) and not R._is_swapped(conv)
    assert type(conv).__name__ == "ParametrizedConv2d" and isinstance(conv, nn.Conv2d)
    d = copy.deepcopy(base)
    parametrizations.weight_norm(d.layer2[0].conv2)
    torch.testing.assert_close(c(x), d(x), rtol=1e-12, atol=1e-12)


class _After(nn.Module):
    """conv -> op -> conv -> global pool: ``op`` runs on a feature map outside the converted layers."""

    def __init__(self, op):
        super().__init__()
        self.a, self.b, self.op = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), op
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.b(self.op(self.a(x)))).flatten(1)


_MIXING = {  # ops that mix positions; several keep the shape on a 1x1 (or square) map
    "SE squeeze": lambda x: x * x.mean((2, 3), keepdim=True),
    "amax": lambda x: x * x.amax(dim=(-1, -2), keepdim=True),
    "mean dim=None": lambda x: x * torch.mean(x, dim=None, keepdim=True),
    "F.group_norm": lambda x: F.group_norm(x, 2),
    "F.avg_pool2d": lambda x: F.avg_pool2d(x, 3, 1, 1),
    "F.adaptive_avg_pool2d": lambda x: x * F.adaptive_avg_pool2d(x, 1),
    "softmax over W": lambda x: x.softmax(dim=-1),
    "transpose": lambda x: x.transpose(2, 3),
    "permute": lambda x: x.permute(0, 1, 3, 2),
    "flip": lambda x: x.flip(3),
    "roll": lambda x: x.roll(1, 2),
    "cumsum": lambda x: x.cumsum(2),
    "flip varargs": lambda x: x.flip(1, 3),
    "movedim": lambda x: x.movedim((2, 3), (3, 2)),
    "batch transpose": lambda x: x.transpose(0, 1).flip(1).transpose(0, 1),  # samples mixed
    "mT": lambda x: x.mT,
    "normalize dim=None": lambda x: F.normalize(x, dim=None),
    "mean input=": lambda x: x * torch.mean(input=x, dim=(2, 3), keepdim=True),
    "vector_norm": lambda x: x * torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True),
    "quantile": lambda x: x * torch.quantile(x, 0.5, dim=3, keepdim=True),
    "rot90": lambda x: x.rot90(2, [2, 3]),
    "renorm": lambda x: x.renorm(2, 1, 1.0),
    "batch mean": lambda x: x * x.mean(0, keepdim=True),
    "cumsum axis=": lambda x: x.cumsum(axis=2),
    "sum over ()": lambda x: x * x.sum((), keepdim=True),  # an empty dim list: every dim
    "mode": lambda x: x * x.mode(keepdim=True).values,  # default dim -1: along W
}


@pytest.mark.parametrize("size", [1, 8])
@pytest.mark.parametrize("name", list(_MIXING))
def test_ops_that_mix_positions_are_refused_by_op_not_shape(name, size):
    # The trace refused only ops that changed the map's shape: traced on a small example (an SE
    # squeeze on a 1x1 map), the squeeze passed and then averaged removed zeros under a mask.
    m = _After(_Lambda(_MIXING[name]))
    with pytest.raises(TypeError, match="cannot track the cumulative stride"):
        R.sparsify(m, example_input=torch.zeros(1, 3, size, size))
    assert not R.is_sparse(m)


_PER_PIXEL = {  # ops that act on each position's channels: fine under a mask
    "channel mean": lambda x: x * x.mean(1, keepdim=True),
    "channel max": lambda x: x * x.max(dim=1, keepdim=True)[0],
    "channel softmax": lambda x: x.softmax(1),
    "elementwise max": lambda x: torch.max(x, 2 * x),
    "elementwise max other=": lambda x: torch.max(x, other=2 * x),
    "channel flip": lambda x: x.flip([1]),
    "movedim in place": lambda x: x.movedim(1, 1),
    "channel mean axis=": lambda x: x * x.mean(axis=1, keepdim=True),
    "normalize": lambda x: F.normalize(x, dim=1),
    "elementwise min other=": lambda x: torch.min(x, other=2 * x),
}


@pytest.mark.parametrize("name", list(_PER_PIXEL))
def test_per_position_ops_are_accepted_and_exact(name):
    torch.manual_seed(0)
    m = _After(_Lambda(_PER_PIXEL[name])).eval()
    x = torch.randn(2, 3, 16, 16)
    keep = _keep(2, 2, 2)
    want = _ref_after(m, x, keep)
    R.sparsify(m, example_input=torch.zeros(1, 3, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "does not run on the tiles" for some of them
        with R.block_mask(keep, 8):
            got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _ref_after(m, x, keep):
    mask = BlockMask(keep, 8, tuple(x.shape[-2:]))
    h = _ref_conv(m.a, x, mask, (1, 1))
    h = m.op(h)
    h = _ref_conv(m.b, h, mask, (1, 1))
    return masked_avg_pool_reference(h, mask.pixel_mask(1, h.shape[-2:])).reshape(len(x), -1)


class _TrainOnlyBranch(nn.Module):
    """GoogLeNet's shape: an auxiliary head that runs only in training."""

    def __init__(self):
        super().__init__()
        self.a, self.aux = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.small = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        h = self.a(x)
        if x.shape[-1] < 32:  # a branch the default 64 px trace does not take
            h = self.small(h)
        out = self.pool(h).flatten(1)
        return (out, self.pool(self.aux(h)).flatten(1)) if self.training else out


def test_untraced_modules_are_named_and_retraced_on_request():
    m = _TrainOnlyBranch()
    with pytest.warns(UserWarning, match=r"2 converted module\(s\) did not run in the stride trace .*: aux, small;"):
        R.sparsify(m)
    keep = _keep(2, 2, 2)
    with pytest.raises(ValueError, match=r"sparse ResNet: small \(.*Conv2d\) did not run"):
        with R.block_mask(keep, 8):
            m.eval()(torch.randn(2, 3, 16, 16))
    # a converted model is traced again when given an example_input (it returned as is before)
    with pytest.warns(UserWarning, match=r"1 converted module\(s\) .*: aux;"):
        R.sparsify(m, example_input=torch.zeros(1, 3, 16, 16))
    with R.block_mask(keep, 8):
        m.eval()(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"sparse ResNet: aux \(.*Conv2d\) did not run .* only in training"):
        with R.block_mask(keep, 8):
            m.train()(torch.randn(2, 3, 16, 16))
    R.unsparsify(m)
    assert not any("_effssl_name" in mod.__dict__ for mod in m.modules())


def test_a_later_stage_called_on_its_own():
    """layer2 called alone (input at stride 4): a keep grid cannot say the image size, so it is
    refused with the way out; a BlockMask (which carries it) runs, equal to the references."""
    model = R.sparsify(_randomize_bn(torchvision.models.resnet18(num_classes=4)).double().eval())
    x = torch.randn(2, 64, 16, 16, dtype=torch.float64)  # layer2's input for a 64 x 64 image
    keep = _keep(2, 4, 4)
    with pytest.raises(ValueError, match="first masked layer.*pass a BlockMask"), \
            R.block_mask(keep, 16):
        model.layer2(x)
    mask = BlockMask(keep, 16, 64)
    with R.block_mask(mask):
        y = as_dense(model.layer2(x))
    want, s = x, 4
    for blk in model.layer2:
        want, s = _ref_block(blk, want, mask, s)
    assert s == 8 and not torch.equal(want, torch.zeros_like(want))
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9)
    # a packed input carries its image size: the keep grid then works (same block size only)
    with R.block_mask(keep, 16):
        torch.testing.assert_close(as_dense(model.layer2(pack_map(x, mask, (4, 4)))), want,
                                   rtol=1e-9, atol=1e-9)
    other = pack_map(x, BlockMask(_keep(2, 8, 8), 8, 64), (4, 4))
    with pytest.raises(ValueError, match="first masked layer"), R.block_mask(keep, 16):
        model.layer2(other)


def test_keep_grid_is_read_when_the_with_is_entered():
    """The keep tensor is copied at ``block_mask``: changing it in place inside the ``with``
    (e.g. the next step's keep computed into the same buffer) does not change this step's mask."""
    conv = R.sparsify(_randomize_bn(_cifar_resnet()).double().eval())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    keep = _keep(2, 8, 8)  # block 4: layer4 (stride 8) runs masked-dense, from the pixel masks
    with R.block_mask(keep.clone(), 4):
        want = conv(x)
    with R.block_mask(keep, 4):
        keep.fill_(True)
        got = conv(x)
    with R.block_mask(keep, 4):
        assert not torch.allclose(conv(x), want)  # all kept differs
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sparsify_again_behind_a_new_stem():
    """A sparsified model put behind a new strided stem and sparsified again: its old first layer
    is first no more (its input is at stride 2), exactly as when the whole is converted once."""
    inner = _randomize_bn(_cifar_resnet()).double().eval()
    stem = nn.Conv2d(3, 3, 3, 2, 1).double()
    twice = R.sparsify(nn.Sequential(copy.deepcopy(stem), R.sparsify(copy.deepcopy(inner))))
    once = R.sparsify(nn.Sequential(copy.deepcopy(stem), copy.deepcopy(inner)))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    keep = _keep(2, 8, 8)
    for mask in (BlockMask(keep, 8, 64), keep):
        with R.block_mask(mask, None if isinstance(mask, BlockMask) else 8):
            torch.testing.assert_close(twice(x), once(x), rtol=0, atol=0)


def test_a_recompute_leaves_the_last_image_as_it_was():
    """A checkpoint's recomputation runs under its own forward's image and then restores the
    state's latest image: a stage called on its own afterwards (dense input, keep grid) runs
    with a mask (not None) and equals its result outside. Which image it takes cannot show in
    the output: a keep grid's pixel masks do not depend on the image size (32 or 33 px here),
    only its tile layout does (audit 97's r28, equivalent)."""
    m = R.sparsify(_randomize_bn(_cifar_resnet()).double().eval())
    x1, x2 = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(2, 3, 33, 33, dtype=torch.float64)
    keep = _keep(2, 16, 16, seed=1)  # block 2: layer3's output (layer4's input) is dense

    def upto_layer3(x, checkpointed):
        x = m.relu(m.bn1(m.conv1(x)))
        for layer in (m.layer1, m.layer2, m.layer3):
            x = R.checkpoint(layer, x) if checkpointed else layer(x)
        return x

    with R.block_mask(keep, 2):
        h2 = upto_layer3(x2, False).detach()
        want = as_dense(m.layer4(h2))
    with R.block_mask(keep, 2):
        y1 = upto_layer3(x1, True)
        upto_layer3(x2, False)
        y1.sum().backward()  # recomputes x1's stages
        got = as_dense(m.layer4(h2))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_timm_fast_avg_pool_is_the_kept_mean():
    # FastAdaptiveAvgPool under a mask that removes blocks: the mean over kept positions, as
    # the nn.AdaptiveAvgPool2d of global_pool="avg" (an all-kept mask cannot tell)
    timm = pytest.importorskip("timm")
    avg = _randomize_bn(timm.create_model("resnet18", num_classes=4, global_pool="avg")).double().eval()
    fast = timm.create_model("resnet18", num_classes=4, global_pool="fast").double().eval()
    fast.load_state_dict(avg.state_dict())
    R.sparsify(avg)
    R.sparsify(fast)
    keep = torch.tensor([[[True, False], [False, True]], [[True, True], [True, False]]])
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with R.block_mask(keep, 32):
        torch.testing.assert_close(fast(x), avg(x), rtol=1e-10, atol=1e-10)


def test_a_module_shared_at_two_strides_is_refused():
    # one conv run on a stride-1 and a stride-2 map: one input stride cannot describe it
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(3, 4, 3, 2, 1)
            self.b = nn.Conv2d(4, 4, 3, 1, 1)
            self.p1, self.p2 = nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return (self.p1(self.b(self.a(x))) + self.p2(self.b(self.c(x)))).flatten(1)

    m = Shared()
    with pytest.raises(TypeError, match=r"runs at strides \(1, 1\) and \(2, 2\)"):
        R.sparsify(m, example_input=torch.zeros(1, 3, 16, 16))
    assert not R.is_sparse(m)
