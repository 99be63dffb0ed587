"""The block-sparse path on a CUDA device (skipped elsewhere): halo_gather's Triton kernel inside
sparse_conv2d, a sparsified ResNet (packed maps, cuDNN on tiles) against the masked references,
bf16 autocast with channels_last, and Inductor compiling a converted model."""
import copy

import pytest
import torch

from effssl_kernels.masks import BlockMask
from effssl_kernels.nn import resnet as R
from effssl_kernels.reference.masked_net import masked_conv2d_reference
from effssl_kernels.sparse import sparse_conv2d
from effssl_kernels.sparse.packed import PackedMap
from utils import random_mask, requires_gpu

pytestmark = requires_gpu


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 convolutions and matmuls in full precision, so the comparisons below are tight."""
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (7, 2, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sparse_conv2d_cuda_matches_reference(k, stride, pad, layout):
    mask = random_mask(4, 64, 64, 16, p=0.5, seed=k, device="cuda")
    x = torch.randn(4, 8, 32, 32, device="cuda", dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 8, k, k, device="cuda", dtype=torch.float64)
    b = torch.randn(16, device="cuda", dtype=torch.float64)
    x.requires_grad_(True)
    y = sparse_conv2d(x, w, b, stride, pad, mask=mask, in_stride=2)
    r = masked_conv2d_reference(x, w, b, stride, pad, mask=mask, in_stride=2)
    torch.testing.assert_close(y, r, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(r)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(r, x, g)[0],
                               rtol=1e-10, atol=1e-10)


def _resnet50_pair():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.resnet50(num_classes=10).cuda()
    return m, R.sparsify(copy.deepcopy(m))


def test_resnet50_packed_on_cuda_matches_per_layer_path(monkeypatch):
    """ResNet-50 at 224 / block 32: every map packed; same numbers as the per-layer path."""
    from effssl_kernels.sparse import packed as P

    _, a = _resnet50_pair()
    b = copy.deepcopy(a)
    a.double()
    b.double()
    x = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.float64)
    keep = torch.rand(4, 7, 7, device="cuda") < 0.5
    keep[:, 0, 0] = True
    seen = []
    hook = a.layer3.register_forward_hook(lambda m, i, o: seen.append(type(o)))
    with R.block_mask(BlockMask(keep, 32, 224)):
        ya = a(x)
    hook.remove()
    assert seen == [PackedMap]
    monkeypatch.setattr(P, "packing_enabled", lambda: False)
    with R.block_mask(BlockMask(keep, 32, 224)):
        yb = b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-9, atol=1e-10)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-7, atol=1e-9,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_resnet50_bf16_channels_last_step():
    """All kept under bf16 autocast: the sparse model's error against the fp32 dense model is at
    most twice the dense bf16 model's (the flash-attention rule), plus a little."""
    dense, sparse = _resnet50_pair()
    dense = dense.eval().to(memory_format=torch.channels_last)  # eval: BN from running stats
    sparse = sparse.eval().to(memory_format=torch.channels_last)
    x = torch.rand(8, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    keep = torch.ones(8, 7, 7, dtype=torch.bool, device="cuda")
    y32 = dense(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yd = dense(x)
        with R.block_mask(BlockMask(keep, 32, 224)):  # all kept: the dense network
            ys = sparse(x)
    ys.float().sum().backward()
    assert torch.isfinite(ys).all() and sparse.conv1.weight.grad is not None
    err, ref_err = (ys.float() - y32).abs().max(), (yd.float() - y32).abs().max()
    assert err <= 2 * ref_err + 1e-2 * y32.abs().max()


def test_inductor_compiles_a_converted_model_on_cuda():
    """Outputs of three masks (gradients: the CPU version, test_sparsify_compile.py)."""
    torchvision = pytest.importorskip("torchvision")
    torch._dynamo.reset()
    dev_model = R.sparsify(torchvision.models.resnet18(num_classes=10).cuda().double())
    compiled = torch.compile(copy.deepcopy(dev_model), fullgraph=True)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float64)
    for p in (0.3, 0.6, 0.9):
        keep = torch.rand(2, 4, 4, device="cuda") < p
        keep[:, 0, 0] = True
        with R.block_mask(BlockMask(keep, 16, 64)):
            ye = dev_model(x)
        with R.block_mask(BlockMask(keep, 16, 64)):
            yc = compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-9, atol=1e-10)
