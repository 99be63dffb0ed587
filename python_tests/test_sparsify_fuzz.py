"""Property fuzz of a sparsified small ResNet (stem conv, BatchNorm, max pool, a strided BasicBlock
with downsample, average pool, fc) in every dtype and layout, train and eval, BatchNorm with and
without affine parameters and running statistics, masks from empty to full: output, input and
parameter gradients and running statistics against a chain of the float64 references.

Tolerance: within a dtype's relative bound of the float64 truth, or within twice the error of the
same chain of references run in that dtype (plus the bound). Found audit 88's CPU bf16/fp16 conv
backward bugs; the @example rows are those cases."""
import copy

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.resnet import BasicBlock

from effssl_kernels.masks import BlockMask
from effssl_kernels.nn import resnet as R
from effssl_kernels.reference.masked_net import (
    masked_avg_pool_reference,
    masked_batch_norm_reference,
    masked_conv2d_reference,
    masked_max_pool2d_reference,
)
from effssl_kernels.sparse.packed import as_dense
from test_sparsify_resnet import _randomize_bn

# relative to max|truth| + 1
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
PATTERNS = ["random", "all", "none", "one", "checker", "row", "col"]


class Net(nn.Module):
    def __init__(self, c1, c2, k, pool, affine, track):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, k, 2, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(c1, affine=affine, track_running_stats=track)
        self.pool = nn.MaxPool2d(3, 2, 1) if pool else nn.Identity()
        ds = nn.Sequential(nn.Conv2d(c1, c2, 1, 2, bias=False), nn.BatchNorm2d(c2))
        self.block = BasicBlock(c1, c2, 2, ds)
        self.avg = nn.AdaptiveAvgPool2d(1)  # the module: sparsify refuses the functional form
        self.fc = nn.Linear(c2, 3)

    def forward(self, x):
        x = self.block(self.pool(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avg(x), 1))


def _keep(n, hb, wb, pattern, seed, p):
    g = torch.Generator().manual_seed(seed)
    pick = lambda size: int(torch.randint(size, (), generator=g))
    k = torch.zeros(n, hb, wb, dtype=torch.bool)
    if pattern == "random":
        k = torch.rand(n, hb, wb, generator=g) < p
    elif pattern == "all":
        k[:] = True
    elif pattern == "one":
        k[pick(n), pick(hb), pick(wb)] = True
    elif pattern == "checker":
        ij = torch.arange(hb).view(-1, 1) + torch.arange(wb) + pick(2)
        k[:] = ij % 2 == 0
    elif pattern == "row":
        k[:, pick(hb), :] = True
    elif pattern == "col":
        k[:, :, pick(wb)] = True
    return k  # "none": nothing kept


# ----------------------------------------------------------------------------- the oracle
def _bn(bn, x, mask, s):
    track = bn.running_mean is not None
    if bn.training and track:
        bn.num_batches_tracked.add_(1)
    return masked_batch_norm_reference(x, mask.pixel_mask(s, x.shape[-2:]), bn.running_mean,
                                       bn.running_var, bn.weight, bn.bias,
                                       bn.training or not track, bn.momentum, bn.eps)


def _conv(c, x, mask, s):
    return masked_conv2d_reference(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups,
                                   mask=mask, in_stride=s)


def _ref_forward(m, x, mask):
    x, s = F.relu(_bn(m.bn1, _conv(m.conv1, x, mask, 1), mask, 2)), 2
    if isinstance(m.pool, nn.MaxPool2d):
        x, s = masked_max_pool2d_reference(x, 3, 2, 1, mask=mask, in_stride=s), 4
    b = m.block
    out = F.relu(_bn(b.bn1, _conv(b.conv1, x, mask, s), mask, 2 * s))
    out = _bn(b.bn2, _conv(b.conv2, out, mask, 2 * s), mask, 2 * s)
    idt = _bn(b.downsample[1], _conv(b.downsample[0], x, mask, s), mask, 2 * s)
    x = F.relu(out + idt)
    return m.fc(masked_avg_pool_reference(x, mask.pixel_mask(2 * s, x.shape[-2:])))


def _step(model, x, keep, block, train, ref):
    """(y, x.grad, {param: grad}, {float buffer: value}) after one forward and backward."""
    model.train(train)
    x = x.detach().clone().requires_grad_(True)
    if ref:
        y = _ref_forward(model, x, BlockMask(keep, block, tuple(x.shape[-2:])))
    else:
        with R.block_mask(keep, block):
            y = as_dense(model(x))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (y * g.to(y.dtype)).sum().backward()
    return (y.detach(), x.grad, {k: p.grad for k, p in model.named_parameters()},
            {k: b.clone() for k, b in model.named_buffers() if b.is_floating_point()})


def _close(name, got, truth, same, dtype, case):
    assert got is not None and tuple(got.shape) == tuple(truth.shape), (name, case)
    g, t = got.double(), truth.double()
    assert torch.isfinite(g).all() == torch.isfinite(t).all(), f"{name}: non-finite {case}"
    err, scale = (g - t).abs().max().item(), t.abs().max().item() + 1.0
    bound = TOL[dtype] * scale
    assert err <= bound or err <= 2 * (same.double() - t).abs().max().item() + bound, \
        f"{name}: max err {err:.3g} (bound {bound:.3g}) {case}"


CASE = dict(N=1, B=4, Hb=1, Wb=1, pattern="random", p=0.3, dtype=torch.bfloat16, c1=2, c2=1, k=3,
            pool=True, affine=True, track=True, train=False, cl=False, seed=952)


@st.composite
def cases(draw):
    return dict(N=draw(st.integers(1, 3)), B=draw(st.sampled_from([1, 2, 4, 8, 16])),
                Hb=draw(st.sampled_from([1, 3, 5])), Wb=draw(st.sampled_from([1, 3, 5])),
                pattern=draw(st.sampled_from(PATTERNS)), p=draw(st.sampled_from([0.3, 0.7])),
                dtype=draw(st.sampled_from(list(TOL))), c1=draw(st.integers(1, 6)),
                c2=draw(st.integers(1, 6)), k=draw(st.sampled_from([3, 5, 7])),
                pool=draw(st.booleans()), affine=draw(st.booleans()), track=draw(st.booleans()),
                train=draw(st.booleans()), cl=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@given(c=cases())
@example(c=CASE)  # bf16 weight gradient of a channels-last 1x1 map (oneDNN read garbage)
@example(c=dict(CASE, Wb=1, pattern="col", c1=4, c2=2, k=5, affine=False, track=False, seed=348))
@example(c=dict(CASE, B=2, Hb=5, Wb=5, pattern="all", dtype=torch.float16, c1=6, c2=6, train=True))
@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_sparsified_net_matches_reference_chain(c):
    note(str(c))
    h, w, d = c["Hb"] * c["B"], c["Wb"] * c["B"], c["dtype"]
    if h < 4 or w < 4:  # the stem, pool and block need a 4 x 4 image at least
        h, w = max(h, 4 * c["B"]), max(w, 4 * c["B"])
    hb, wb = h // c["B"], w // c["B"]
    torch.manual_seed(c["seed"])
    base = _randomize_bn(Net(c["c1"], c["c2"], c["k"], c["pool"], c["affine"], c["track"]), c["seed"])
    keep = _keep(c["N"], hb, wb, c["pattern"], c["seed"], c["p"])
    x = torch.randn(c["N"], 3, h, w, generator=torch.Generator().manual_seed(c["seed"] + 1),
                    dtype=torch.float64)
    if c["cl"]:
        x = x.contiguous(memory_format=torch.channels_last)
    truth = _step(copy.deepcopy(base).double(), x, keep, c["B"], c["train"], ref=True)
    same = _step(copy.deepcopy(base).to(d), x.to(d), keep, c["B"], c["train"], ref=True)
    sp = R.sparsify(copy.deepcopy(base).to(d), example_input=torch.zeros(1, 3, h, w, dtype=d))
    got = _step(sp, x.to(d), keep, c["B"], c["train"], ref=False)
    _close("y", got[0], truth[0], same[0], d, c)
    _close("x.grad", got[1], truth[1], same[1], d, c)
    removed = ~BlockMask(keep, c["B"], (h, w)).pixel_mask(1, (h, w)).expand_as(got[1])
    assert torch.all(got[1][removed] == 0), f"gradient under removed blocks {c}"
    for i, name in ((2, "grad"), (3, "buffer")):
        assert got[i].keys() == truth[i].keys()
        for k in truth[i]:
            _close(f"{name} {k}", got[i][k], truth[i][k], same[i][k], d, c)
