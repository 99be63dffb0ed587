"""The masked-dense conv and BatchNorm Functions (effssl_kernels/sparse/masked_dense.py) against
their plain-PyTorch references: values, gradients (float64 gradcheck and gradgradcheck),
running statistics, the edge counts of BatchNorm (nothing kept, one position kept), autocast,
channels-last, vmap, torch.compile, and what autograd saves (the layer's input, not a masked
copy or BatchNorm's intermediates)."""
import re

import pytest
import torch

import effssl_kernels as ek
from effssl_kernels.reference.masked_net import masked_batch_norm_reference, masked_conv2d_reference
from effssl_kernels.sparse.masked_dense import masked_batch_norm, masked_conv2d
from utils import random_mask

CONVS = [  # (weight shape, stride, padding, dilation, groups, in_stride, channels_last)
    ((5, 4, 3, 3), 1, 1, 1, 1, 1, False),
    ((5, 4, 3, 3), 2, 1, 1, 1, 2, True),
    ((6, 2, 3, 3), 1, "same", 2, 2, 1, False),
    ((5, 4, 2, 2), 1, "valid", 1, 1, 1, False),
    ((5, 4, 1, 1), 2, 0, 1, 1, 1, True),     # the sliced strided 1x1 (channels-last, CPU bug)
    ((5, 4, 1, 1), 2, 0, 1, 1, 1, False),
    ((5, 4, 3, 3), (2, 1), (0, 2), (1, 2), 1, 1, False),
    ((5, 4, 2, 2), 1, "same", 1, 1, 1, False),  # 'same' with an even reach: the reference runs
    ((5, 4, 1, 1), (2, 1), 0, 1, 1, 1, True),   # sliced with unequal strides: rows and columns kept apart
    ((5, 4, 2, 3), 1, "same", 1, 1, 1, False),  # 'same' with one odd reach (rows) only: the reference
    ((5, 4, 3, 5), 1, "same", 1, 1, 1, False),  # 'same', even reaches 2 and 4: rows and columns padded apart
]


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in ts]


def _assert_same_grads(got, got_leaves, want, want_leaves, tol):
    """The gradients of both outputs for one random cotangent: finite and within ``tol``."""
    go = torch.randn_like(want)
    got_g = torch.autograd.grad(got, [t for t in got_leaves if t is not None], go)
    want_g = torch.autograd.grad(want, [t for t in want_leaves if t is not None], go)
    for a, e in zip(got_g, want_g):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


def _x(shape, channels_last, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("wshape,stride,padding,dilation,groups,in_stride,cl", CONVS)
@pytest.mark.parametrize("bias", [True, False])
def test_masked_conv_matches_reference(wshape, stride, padding, dilation, groups, in_stride, cl, bias):
    mask = random_mask(2, 24, 16, 4, p=0.5, seed=1)
    x = _x((2, 4, 24 // in_stride, 16 // in_stride), cl, 0)
    x[:, :, :3] = float("nan")  # under removed blocks (and kept ones) alike: must not leak
    x = torch.where(mask.pixel_mask(in_stride, x.shape[-2:]), x.nan_to_num(0.5), x)
    w = torch.randn(wshape, dtype=torch.float64)
    b = torch.randn(wshape[0], dtype=torch.float64) if bias else None
    args = (stride, padding, dilation, groups)
    got_l, want_l = _leaves(x, w, b), _leaves(x, w, b)
    got = masked_conv2d(*got_l, *args, mask=mask, in_stride=in_stride)
    want = masked_conv2d_reference(*want_l, *args, mask=mask, in_stride=in_stride)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(
        memory_format=torch.channels_last)
    _assert_same_grads(got, got_l, want, want_l, 1e-11)


def test_masked_conv_gradcheck_and_gradgradcheck_float64():
    mask = random_mask(1, 8, 8, 4, p=0.5, seed=3)
    x, w, b = _leaves(torch.randn(1, 2, 4, 4, dtype=torch.float64),
                      torch.randn(3, 2, 3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    for stride in (1, 2):
        def f(x, w, b):
            return masked_conv2d(x, w, b, stride, 1, mask=mask, in_stride=2)

        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_masked_conv_saves_its_input_not_a_masked_copy():
    mask = random_mask(2, 16, 16, 4, p=0.5, seed=0)
    x = torch.randn(2, 4, 16, 16)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    for fn, copies in ((masked_conv2d, 0), (masked_conv2d_reference, 1)):
        ptrs = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: ptrs.append((t.data_ptr(), t.shape)) or t,
                                                      lambda t: t):
            fn(x, w, None, 1, 1, mask=mask)
        full = [p for p in ptrs if p[1] == x.shape]
        assert len([p for p in full if p[0] != x.data_ptr()]) == copies, ptrs


def test_masked_conv_under_autocast_and_compile():
    mask = random_mask(2, 16, 16, 4, p=0.5, seed=0)
    x = torch.randn(2, 4, 16, 16)
    w = torch.randn(6, 4, 3, 3)
    got_l, want_l = _leaves(x, w), _leaves(x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = masked_conv2d(*got_l, None, 2, 1, mask=mask)
        want = masked_conv2d_reference(*want_l, None, 2, 1, mask=mask)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    go = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, got_l, go), torch.autograd.grad(want, want_l, go)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-2)

    def f(x, w):
        return masked_conv2d(x, w, None, 2, 1, mask=mask).square().sum()

    got_l, want_l = _leaves(x, w), _leaves(x, w)
    want = torch.autograd.grad(f(*want_l), want_l)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*got_l), got_l)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_masked_conv_errors_are_the_references():
    mask = random_mask(2, 16, 16, 4, seed=0)
    x = torch.randn(2, 4, 16, 16)
    for kwargs in ({"padding": -1}, {"dilation": 0}, {"padding": "same", "stride": 2},
                   {"padding": "full"}, {"groups": 3}):
        w = torch.randn(6, 4, 3, 3)
        with pytest.raises((RuntimeError, ValueError)) as want:
            masked_conv2d_reference(x, w, mask=mask, **kwargs)
        with pytest.raises(want.type, match="^" + re.escape(str(want.value)) + "$"):
            masked_conv2d(x, w, mask=mask, **kwargs)
    with pytest.raises(RuntimeError):  # output smaller than one pixel
        masked_conv2d(torch.randn(2, 4, 2, 2), torch.randn(6, 4, 3, 3), mask=random_mask(2, 8, 8, 4), in_stride=4)


def _bn_case(C=3, p=0.5, seed=0, dtype=torch.float64, shape=(3, 10, 12), B=2):
    N, H, W = shape
    mask = random_mask(N, H, W, B, p=p, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    m = mask.pixel_mask(1, (H, W))
    stats = (torch.randn(C, generator=g, dtype=torch.float64).to(dtype),
             torch.rand(C, generator=g, dtype=torch.float64).add(0.5).to(dtype))
    wb = (torch.randn(C, generator=g, dtype=torch.float64).to(dtype),
          torch.randn(C, generator=g, dtype=torch.float64).to(dtype))
    return x, m, stats, wb


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.4, 1.0])
def test_masked_batch_norm_matches_reference(training, affine, p):
    x, m, (rm, rv), (w, b) = _bn_case(p=p)
    x = torch.where(m, x, torch.full_like(x, float("inf")))  # removed inputs must not leak
    w, b = (w, b) if affine else (None, None)
    stats_got, stats_want = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
    got_l, want_l = _leaves(x, w, b), _leaves(x, w, b)
    got = masked_batch_norm(got_l[0], m, *stats_got, *got_l[1:], training, 0.3, 1e-5)
    want = masked_batch_norm_reference(want_l[0], m, *stats_want, *want_l[1:], training, 0.3, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, e in zip(stats_got, stats_want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert p > 0 or torch.equal(stats_got[0], rm)  # nothing kept: no update
    _assert_same_grads(got, got_l, want, want_l, 1e-10)


def test_masked_batch_norm_one_kept_position_and_no_running_stats():
    x, _, _, (w, b) = _bn_case()
    m = torch.zeros(x.shape[0], 1, *x.shape[2:], dtype=torch.bool)
    m[1, 0, 3, 4] = True  # n = 1: variance 0, the output is the bias there
    got_l, want_l = _leaves(x, w, b), _leaves(x, w, b)
    got = masked_batch_norm(got_l[0], m, None, None, *got_l[1:], True, 0.1, 1e-5)
    want = masked_batch_norm_reference(want_l[0], m, None, None, *want_l[1:], True, 0.1, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1, :, 3, 4], b)
    go = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, got_l, go), torch.autograd.grad(want, want_l, go)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_masked_batch_norm_gradcheck_and_gradgradcheck_float64(training):
    x, m, (rm, rv), (w, b) = _bn_case(C=2, shape=(2, 4, 4))
    x, w, b = _leaves(x, w, b)

    def f(x, w, b):  # running stats updated on every call: pass copies
        return masked_batch_norm(x, m, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_masked_batch_norm_low_precision_and_channels_last(dtype, tol):
    x, m, (rm, rv), (w, b) = _bn_case(C=8, dtype=torch.float32, shape=(4, 16, 16), B=4)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = w.requires_grad_(), b.requires_grad_()
    stats_got, stats_want = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
    got_l, want_l = _leaves(x, w, b), _leaves(x, w, b)
    got = masked_batch_norm(got_l[0], m, *stats_got, *got_l[1:], True, 0.1, 1e-5)
    want = masked_batch_norm_reference(want_l[0], m, *stats_want, *want_l[1:], True, 0.1, 1e-5)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(stats_got, stats_want, rtol=1e-6, atol=1e-6)
    go = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, got_l, go), torch.autograd.grad(want, want_l, go)):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a.float(), e.float(), rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_batch_norm_eval_uses_float32_running_stats_unrounded(dtype):
    """Eval with a half map and float32 running statistics (a float32 model fed half maps): the
    statistics enter the float32 arithmetic as they are; rounded to the map's dtype first, a mean
    of 1000.37 moves by 0.13 (fp16) or 1.6 (bf16), output errors of 0.6 to 7 at var 0.05."""
    x, m, _, (w, b) = _bn_case(C=4, dtype=torch.float32, shape=(2, 8, 8))
    x = (1000 + x * 0.2).to(dtype)
    rm, rv = torch.full((4,), 1000.37), torch.full((4,), 0.05)
    got = masked_batch_norm(x, m, rm, rv, w, b, False, 0.1, 1e-5)
    want = masked_batch_norm_reference(x, m, rm, rv, w, b, False, 0.1, 1e-5)
    exact = masked_batch_norm_reference(x.double(), m, rm.double(), rv.double(), w.double(),
                                        b.double(), False, 0.1, 1e-5)
    assert got.dtype == want.dtype == dtype
    tol = 2 * torch.finfo(dtype).eps * exact.abs().max().item()
    torch.testing.assert_close(want.double(), exact, atol=tol, rtol=0)  # the oracle itself
    torch.testing.assert_close(got.double(), exact, atol=tol, rtol=0)


def test_masked_batch_norm_saves_only_its_input():
    x, m, (rm, rv), (w, b) = _bn_case(C=4, dtype=torch.float32, shape=(2, 16, 16))
    x, w, b = _leaves(x, w, b)
    for fn, most in ((masked_batch_norm, 1), (masked_batch_norm_reference, 3)):
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.setdefault((t.data_ptr(), t.dtype), t.numel()) and t, lambda t: t):
            fn(x, m, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5)
        full = [k for k, n in saved.items() if n == x.numel()]
        assert (len(full) == most) if fn is masked_batch_norm else (len(full) >= most), saved
        if fn is masked_batch_norm:
            assert full == [(x.data_ptr(), x.dtype)]


def test_masked_batch_norm_vmap_compile_and_forward_ad():
    x, m, (rm, rv), (w, b) = _bn_case(C=3, dtype=torch.float64)
    ws = torch.randn(4, 3, dtype=torch.float64)
    got = torch.func.vmap(lambda w: masked_batch_norm(x, m, None, None, w, b, True, 0.1, 1e-5))(ws)
    want = torch.stack([masked_batch_norm_reference(x, m, None, None, v, b, True, 0.1, 1e-5) for v in ws])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    def f(x, w):
        return masked_batch_norm(x, m, None, None, w, b, True, 0.1, 1e-5).square().sum()

    got_l, want_l = _leaves(x, w), _leaves(x, w)
    want = torch.autograd.grad(f(*want_l), want_l)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*got_l), got_l)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    dx = torch.randn_like(x)
    _, got = torch.func.jvp(lambda x: masked_batch_norm(x, m, None, None, w, b, True, 0.1, 1e-5), (x,), (dx,))
    _, want = torch.func.jvp(lambda x: masked_batch_norm_reference(x, m, None, None, w, b, True, 0.1, 1e-5),
                             (x,), (dx,))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_masked_batch_norm_errors_are_the_references():
    x, m, (rm, rv), (w, b) = _bn_case()
    for args, kw in (((rm, None), {}), ((None, None), {"training": False}), ((rm[:2], rv), {}),
                     ((rm, rv), {"momentum": None})):
        kw = {"training": True, "momentum": 0.1, **kw}
        with pytest.raises(ValueError, match="masked_batch_norm"):
            masked_batch_norm(x, m, *args, w, b, kw["training"], kw["momentum"])
        with pytest.raises(ValueError, match="masked_batch_norm_reference"):
            masked_batch_norm_reference(x, m, *args, w, b, kw["training"], kw["momentum"])
    with pytest.raises(ValueError, match="mask_pixels shape"):
        masked_batch_norm(x, m[:1], rm, rv, w, b, True)


def test_sparsified_resnet_masked_dense_layers_save_about_the_dense_models():
    # 64 px, block 16: layer4 (stride 32) is not tile-aligned and runs masked-dense. Its convs
    # and BatchNorms saved 2.6x the dense layer4 (masked copies, BN intermediates); now about 1x.
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)

    def layer4_saved(mask):
        saved = {}
        params = {p.data_ptr() for p in model.parameters()}

        def pack(t):
            if t.numel() and t.data_ptr() not in params:
                saved[(t.data_ptr(), t.dtype)] = t.numel() * t.element_size()
            return t

        def pre(m, a):
            ctx.__enter__()

        def post(m, a, o):
            ctx.__exit__(None, None, None)

        ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        hs = [model.layer4.register_forward_pre_hook(pre), model.layer4.register_forward_hook(post)]
        with ek.block_mask(mask):
            model(x)
        for h in hs:
            h.remove()
        return sum(saved.values())

    dense = layer4_saved(None)
    ek.sparsify(model)
    assert ek.nn.resnet.tile_plan(model, 16, 64)["layer4.0.conv1"] != "tiles"
    sparse = layer4_saved(ek.BlockMask(torch.ones(2, 4, 4, dtype=torch.bool), 16, 64))
    assert sparse <= 1.2 * dense, sparse / dense


@pytest.mark.parametrize("fn", [masked_batch_norm, masked_batch_norm_reference])
def test_batch_norm_running_stats_under_vmap(fn):
    # An ensemble's batched running statistics (torch.func.stack_module_state + vmap): the update
    # keeps the buffers' version counters without `.data`, which vmap refuses (a crash briefly on
    # 2026-12-06). Each member's statistics equal its own call's.
    from torch.func import vmap

    torch.manual_seed(0)
    x, m = torch.randn(2, 3, 4, 4), torch.rand(2, 1, 4, 4) < 0.6
    w = torch.rand(2, 3)
    rm, rv = torch.randn(2, 3), torch.rand(2, 3) + 0.5
    want = [(rm[i].clone(), rv[i].clone()) for i in range(2)]
    ys = [fn(x, m, *want[i], w[i], None, True) for i in range(2)]
    y = vmap(lambda w, rm, rv: fn(x, m, rm, rv, w, None, True))(w, rm, rv)
    torch.testing.assert_close(y, torch.stack(ys))
    torch.testing.assert_close(rm, torch.stack([a for a, _ in want]))
    torch.testing.assert_close(rv, torch.stack([b for _, b in want]))


def test_batch_norm_update_keeps_the_version_counter():
    # As F.batch_norm's in-kernel update: an earlier F.batch_norm of the module saved the buffers
    x, m = torch.randn(2, 3, 4, 4), torch.rand(2, 1, 4, 4) < 0.6
    rm, rv = torch.zeros(3), torch.ones(3)
    masked_batch_norm(x, m, rm, rv, None, None, True)
    assert rm._version == 0 and rv._version == 0 and not torch.equal(rm, torch.zeros(3))


def test_bf16_weight_gradient_of_a_channels_last_1x1_map():
    """A packed 1x1 map unpacks channels-last; CPU oneDNN's bf16 weight gradient of a
    channels-last 1x1 input reads garbage in most runs (torch 2.14, audit 88). Twenty runs,
    each after a heap left full of huge values, must all equal the dense NCHW gradient."""
    from effssl_kernels.masks import BlockMask
    from effssl_kernels.sparse import pack_map
    from effssl_kernels.sparse.packed import conv2d_map

    torch.manual_seed(0)
    mask = BlockMask(torch.ones(1, 1, 1, dtype=torch.bool), 4, (4, 4))  # all kept: equals dense
    for _ in range(20):
        junk = torch.full((4096,), 3.0e38)
        del junk
        x = torch.randn(1, 4, 1, 1, dtype=torch.bfloat16)
        w = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
        wd, ws = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
        torch.nn.functional.conv2d(x, wd, None, 2, 1).sum().backward()
        y = conv2d_map(pack_map(x, mask, (4, 4)), ws, None, 2, 1, 1, 1, mask=mask, in_stride=(4, 4))
        y.sum().backward()
        torch.testing.assert_close(ws.grad, wd.grad, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_batch_norm_half_backward_accumulates_in_float32(dtype):
    """The backward of a half map recomputes the statistics and sums the gradients in float32, as
    the forward does: the weight and bias gradients (float32 parameters, sums over ~500 positions)
    equal float64 ones of the same half inputs to float32 precision, not to half precision."""
    x, m, (rm, rv), (w, b) = _bn_case(C=8, dtype=torch.float32, shape=(4, 16, 16), B=4)
    x = x.to(dtype)
    go = torch.randn(x.shape).to(dtype)
    w32, b32 = w.float().requires_grad_(), b.float().requires_grad_()
    got = masked_batch_norm(x.requires_grad_(), m, rm.clone(), rv.clone(), w32, b32, True, 0.1, 1e-5)
    gw, gb = torch.autograd.grad(got, (w32, b32), go)
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    want = masked_batch_norm_reference(x.detach().double(), m, rm.double(), rv.double(), w64, b64, True, 0.1, 1e-5)
    ew, eb = torch.autograd.grad(want, (w64, b64), go.double())
    torch.testing.assert_close(gb.double(), eb, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gw.double(), ew, rtol=1e-5, atol=1e-4)
