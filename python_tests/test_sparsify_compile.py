"""torch.compile(fullgraph=True) of a sparsified ResNet: at most two graphs for every mask (the
first specialises on the first tile count, the second makes it dynamic; no recompile after),
equal to eager in outputs and gradients; with aot_eager and with Inductor."""
import copy

import pytest
import torch

from effssl_kernels.masks import BlockMask
from effssl_kernels.nn import resnet as R

from test_sparsify_resnet import _cifar_resnet, _randomize_bn


@pytest.mark.parametrize("backend,mirrored", [("aot_eager", False), ("inductor", False), ("aot_eager", True)])
def test_compiled_sparse_resnet_one_graph_for_all_masks(backend, mirrored, monkeypatch):
    # mirrored: the mask read through nn/_state.py's mirror, as on torch < 2.14
    from effssl_kernels.nn import _state

    if not mirrored and torch.__version__ < "2.14":
        pytest.skip("this torch's Dynamo cannot trace ContextVar.get: the mirror is what it uses")
    monkeypatch.setattr(_state, "_MIRRORED", mirrored)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    # float64: in float32 the packed (eager) and per-layer (compiled) paths round differently,
    # and BatchNorm's backward on an untrained net amplifies that to ~1% at some steps.
    eager = R.sparsify(_randomize_bn(_cifar_resnet()).double())
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    graphs = []
    for step, p in enumerate((0.3, 0.6, 0.9)):
        keep = torch.rand(2, 4, 4, generator=g) < p
        keep[:, 0, 0] = True
        with R.block_mask(BlockMask(keep, 8, 32)):  # a fresh mask per step, as in training
            ye = eager(x)
        with R.block_mask(BlockMask(keep, 8, 32)):
            yc = compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-9, atol=1e-10)
        ye.square().sum().backward()
        yc.square().sum().backward()
        for (k, pe), pc in zip(eager.named_parameters(), model.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-8, atol=1e-10,
                                       msg=lambda m, k=k: f"step {step} {k}: {m}")
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] <= 2 and graphs[-1] == graphs[-2]  # the third mask compiles nothing


def test_zero_breaking_ops_agree_eager_and_compiled():
    """sigmoid, x + 1, 1 - x, clamp(min > 0) of a masked map turn removed zeros into non-zeros:
    eager (packed maps) and compiled (dense maps per layer) both give the dense op's result on
    the dense masked map, so a consumer that is not a layer (a sum) sees the same numbers; the
    masked pool after them reads only kept positions."""
    import warnings

    from torch import nn

    from effssl_kernels.reference.masked_net import (
        masked_avg_pool_reference,
        masked_conv2d_reference,
    )
    from effssl_kernels.sparse.packed import as_dense

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool = nn.Conv2d(3, 4, 3, 1, 1), nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            h = self.conv(x)
            z = torch.sigmoid(h)
            return self.pool(z), z, h + 1, 1 - h, h.clamp(min=0.5), torch.relu(h)

    torch._dynamo.reset()
    eager = R.sparsify(Net().double(), example_input=torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    keep = torch.tensor([[[True, False], [False, False]]])
    mask = BlockMask(keep, 8, 16)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager unpacks after the zero-breaking ops
        with R.block_mask(keep, 8):
            ye = [as_dense(t) for t in eager(x)]
    with R.block_mask(keep, 8):
        yc = compiled(x)
    h = masked_conv2d_reference(x, eager.conv.weight, eager.conv.bias, 1, 1, mask=mask)
    want = [masked_avg_pool_reference(torch.sigmoid(h), mask.pixel_mask(1, (16, 16))).view(1, 4, 1, 1),
            torch.sigmoid(h), h + 1, 1 - h, h.clamp(min=0.5), torch.relu(h)]
    for i, (a, b, w) in enumerate(zip(ye, yc, want)):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12, msg=lambda m, i=i: f"eager {i}: {m}")
        torch.testing.assert_close(b, w, rtol=1e-12, atol=1e-12, msg=lambda m, i=i: f"compiled {i}: {m}")
    torch.testing.assert_close(ye[1].flatten(1).sum(1), yc[1].flatten(1).sum(1))
