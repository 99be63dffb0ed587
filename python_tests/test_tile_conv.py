"""tile_conv (Triton implicit GEMM over packed tiles, halo read through the table) against the
reference ``F.conv2d(halo_gather_reference(tiles, table))``, forward and every gradient, and the
sparse path with EFFSSL_TILE_CONV=implicit against the masked dense oracle.

On a GPU machine the kernels run on CUDA tensors; elsewhere on CPU tensors under
TRITON_INTERPRET=1 (conftest.py, EFFSSL_BACKEND=triton), so shapes stay small. Under the
interpreter the dot is exact float32 (bfloat16 widened first): float32 is compared at 1e-5, the
half types at their rounding of the output (one ulp of values ~30). On a GPU float32 runs TF32.
"""
import copy

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton")

from effssl_kernels.masks import BlockMask  # noqa: E402
from effssl_kernels.ops.tile_conv import tile_conv  # noqa: E402
from effssl_kernels.reference import masked_conv2d_reference, tile_conv_reference  # noqa: E402
from effssl_kernels.sparse import TileIndex, pack, sparse_conv2d, sparse_conv2d_packed  # noqa: E402
from utils import HAS_GPU, INTERPRET, gpu_tile_choices, make_layout, random_mask  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (HAS_GPU or INTERPRET), reason="needs a CUDA device or TRITON_INTERPRET=1"),
]

DEVICE = "cuda" if HAS_GPU else "cpu"
TOL = {  # float32: IEEE (TF32 off, see the fixture), sums in another order than the reference's
    torch.float32: dict(atol=1e-5, rtol=1e-5) if not HAS_GPU else dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=3e-2, rtol=3e-3),
    torch.bfloat16: dict(atol=2.5e-1, rtol=1.6e-2),
}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("EFFSSL_BACKEND", "triton")
    # float32 in IEEE on a GPU (and in cuDNN, which the sparse path compares with): TF32 has its
    # own test below
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _case(N=2, Hb=3, Wb=3, B=8, in_stride=2, C=5, CO=7, k=3, halo=(1, 1, 1, 1), dtype=torch.float32,
          seed=0, layout="channels_last", bias=True):
    """Packed tiles of a random mask, weight, bias, table and the backward's mirrored table."""
    mask = random_mask(N, Hb * B, Wb * B, B, p=0.6, seed=seed)
    in_stride = (in_stride, in_stride) if isinstance(in_stride, int) else in_stride
    idx = TileIndex.from_mask(mask, in_stride)
    g = torch.Generator().manual_seed(seed)
    T, (bh, bw) = idx.num_tiles, idx.tile
    x = make_layout(torch.randn(T, C, bh, bw, generator=g).to(dtype), layout).to(DEVICE)
    kh, kw = (k, k) if isinstance(k, int) else k
    w = (torch.randn(CO, C, kh, kw, generator=g) / (C * kh * kw) ** 0.5).to(dtype).to(DEVICE)
    b = torch.randn(CO, generator=g).to(dtype).to(DEVICE) if bias else None
    left, right, top, bottom = halo
    idx = TileIndex.from_mask(BlockMask(mask.keep.to(DEVICE), B, mask.image_size), in_stride)
    return x, w, b, idx.halo_table(halo), idx.halo_table((right, left, bottom, top))


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of tile_conv made by effssl_kernels.sparse (the implicit-GEMM path)."""
    import effssl_kernels.sparse.conv as sc

    seen = []
    real = sc.tile_conv
    monkeypatch.setattr(sc, "tile_conv", lambda *a: seen.append(1) or real(*a))
    return seen


def _grads(fn, x, w, b, table, table_t, go, dilation=(1, 1)):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    if fn is tile_conv:
        out = fn(*leaves, table, table_t, dilation)
    else:
        out = fn(*leaves, table, dilation)
    wrt = [t for t in leaves if t is not None]
    return (out, *torch.autograd.grad(out, wrt, go))


# kernel, halo (l, r, t, b), dilation, in_stride: 3x3 p1 ('same'), 2x2 'same' (asymmetric: the
# backward's table is really mirrored), 3x3 dilated 2, 5x5 p2 reaching two tiles of 2x2, 1x3,
# and 2x3 dilated (3, 1) 'same' on 4 x 8 tiles (every axis differs: a swapped h/w shows)
GEOMETRY = [
    (3, (1, 1, 1, 1), (1, 1), 2),
    (2, (0, 1, 0, 1), (1, 1), 2),
    (3, (2, 2, 2, 2), (2, 2), 2),
    (5, (2, 2, 2, 2), (1, 1), 4),
    ((1, 3), (1, 1, 0, 0), (1, 1), 2),
    ((2, 3), (1, 1, 1, 2), (3, 1), (2, 1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geom", GEOMETRY, ids=str)
def test_matches_reference_forward_and_gradients(geom, dtype):
    k, halo, dil, in_stride = geom  # 5x5 on 2x2 tiles: the halo spans two blocks
    x, w, b, table, table_t = _case(k=k, halo=halo, dtype=dtype, in_stride=in_stride)
    go = torch.randn(table.shape[0], w.shape[0], x.shape[2], x.shape[3]).to(dtype).to(DEVICE)
    got = _grads(tile_conv, x, w, b, table, table_t, go, dil)
    ref = _grads(tile_conv_reference, x.cpu().float(), w.cpu().float(), b.cpu().float(), table.cpu(),
                 table_t.cpu(), go.cpu().float(), dil)
    assert got[0].shape == ref[0].shape and got[0].dtype == dtype
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for name, g, r in zip(["out", "tiles", "weight", "bias"], got, ref):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.cpu().float(), r, **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")


def test_flop_counter_counts_what_the_conv_of_the_halo_counts():
    # FlopCounterMode counts an op without a formula as 0: the implicit GEMM looked free
    from torch.utils.flop_counter import FlopCounterMode

    k, halo, dil, in_stride = GEOMETRY[2]
    x, w, b, table, table_t = _case(k=k, halo=halo, in_stride=in_stride)
    go = torch.randn(table.shape[0], w.shape[0], x.shape[2], x.shape[3], device=DEVICE)
    counts = []
    for fn in (tile_conv, tile_conv_reference):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        with FlopCounterMode(display=False) as f:
            out = fn(*leaves, table, table_t, dil) if fn is tile_conv else fn(*leaves, table, dil)
            torch.autograd.grad(out, leaves, go)
        counts.append(f.get_total_flops())
    assert counts[0] == counts[1] > 0, counts


@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_layouts_no_bias_one_pixel_tiles(layout):
    # NCHW and strided tiles; 1x1 tiles (ResNet's layer 4 at block 32): every tap but the centre
    # is a neighbour tile or zeros
    for in_stride, B in ((2, 8), (8, 8)):
        x, w, b, table, table_t = _case(B=B, in_stride=in_stride, layout=layout, bias=False)
        go = torch.randn(table.shape[0], w.shape[0], x.shape[2], x.shape[3]).to(DEVICE)
        got = _grads(tile_conv, x, w, None, table, table_t, go)
        ref = _grads(tile_conv_reference, x.cpu(), w.cpu(), None, table.cpu(), table_t.cpu(), go.cpu())
        for g, r in zip(got, ref):
            torch.testing.assert_close(g.cpu(), r, **TOL[torch.float32])


@pytest.mark.skipif(HAS_GPU, reason="the GPU runs these tiles in every test")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_tile_sizes_under_the_interpreter(monkeypatch, dtype):
    # What the launchers pick on a GPU (128 x 64 x 32 forward, 64 x 64 x 64 weight gradient in
    # several row splits), on a case that fills them partly: 1,472 output rows (12 row tiles, the
    # last one partial), C = 40 (a partial K step) and C_out = 66 (a second, nearly empty
    # channel tile).
    import effssl_kernels.triton.tile_conv as ttc

    seen = gpu_tile_choices(monkeypatch, ttc, ("_fwd_tiles", "_wgrad_tiles"))
    splits = []
    real_splits = ttc._num_splits
    monkeypatch.setattr(ttc, "_num_splits", lambda *a: splits.append(real_splits(*a)) or splits[-1])
    x, w, b, table, table_t = _case(N=4, Hb=4, Wb=4, B=8, in_stride=1, C=40, CO=66, dtype=dtype, seed=1)
    assert x.shape[0] * 64 > 1024
    go = torch.randn(table.shape[0], 66, 8, 8).to(dtype).to(DEVICE)
    got = _grads(tile_conv, x, w, b, table, table_t, go)
    ref = _grads(tile_conv_reference, x.float(), w.float(), b.float(), table, table_t, go.float())
    for name, g, r in zip(["out", "tiles", "weight", "bias"], got, ref):
        # the weight gradient sums 1,472 rows per entry (values ~40): float32 summation order
        tol = dict(atol=1e-5 * r.abs().max().item(), rtol=1e-5) if dtype == torch.float32 else TOL[dtype]
        torch.testing.assert_close(g.float(), r, **tol, msg=lambda m, n=name: f"{n}: {m}")
    # float32 here is IEEE (the fixture turns TF32 off): 1 stage forward, 8 warps weight gradient
    ieee = dtype == torch.float32
    assert seen[0] == (128, 64, 32, 4, 1 if ieee else 3), seen
    assert (64, 64, 64, 8 if ieee else 4, 3) in seen, seen
    assert max(splits) > 1


def test_gemm_precision_follows_cudnn_allow_tf32(monkeypatch):
    # the Triton GEMMs (tile_conv, patch_embed_gather) take float32 in TF32 exactly when the
    # F.conv2d they replace would: cudnn.allow_tf32; half types are what they are
    from effssl_kernels.triton._gemm import input_precision

    for allow in (True, False):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
        assert input_precision(torch.float32) == ("tf32" if allow else "ieee")
        assert input_precision(torch.bfloat16) == input_precision(torch.float16) == "tf32"


@pytest.mark.skipif(not HAS_GPU, reason="TF32 exists on a GPU only (the interpreter's dot is exact)")
def test_tf32_when_cudnn_allows_it(monkeypatch):
    x, w, b, table, table_t = _case(C=64, CO=64)
    ref = tile_conv_reference(x.cpu().double(), w.cpu().double(), b.cpu().double(), table.cpu())
    got = {}
    for allow in (True, False):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
        got[allow] = tile_conv(x, w, b, table, table_t).cpu().double()
    torch.testing.assert_close(got[True], ref, atol=5e-3 * ref.abs().max().item(), rtol=5e-3)
    torch.testing.assert_close(got[False], ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    # TF32 really ran when allowed: its 10-bit mantissa errs far more than IEEE float32
    assert (got[True] - ref).abs().max() > 10 * (got[False] - ref).abs().max()


def test_double_backward_gradient_penalty():
    # Second order through both ops (the weight-gradient op is bilinear and has autograd):
    # a gradient penalty on the input and weight gradients, against the reference's.
    x, w, b, table, table_t = _case(k=(2, 3), halo=(1, 1, 1, 2), in_stride=(2, 1))
    dil = (3, 1)

    def penalty(fn):
        xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = fn(xs, ws, b, table, table_t, dil) if fn is tile_conv else fn(xs, ws, b, table, dil)
        gx, gw = torch.autograd.grad(y.square().sum(), (xs, ws), create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum(), (xs, ws))

    for g, r in zip(penalty(tile_conv), penalty(tile_conv_reference)):
        torch.testing.assert_close(g, r, atol=1e-4 * r.abs().max().item(), rtol=1e-4)


def test_ops_check_the_table_shape():
    # The registered ops (what backward, opcheck and compile call) check the tables themselves:
    # an unpadded table or one row per output tile that is not a source tile would give wrong
    # values silently, as the kernels split source pixels by the output tile's width.
    x, w, b, table, table_t = _case(N=1, Hb=2, Wb=2, C=3, CO=4)
    with pytest.raises(ValueError, match="table must be int64"):
        torch.ops.effssl_kernels._tile_conv_triton(x, w, b, table[:, 1:-1, 1:-1].contiguous(), table_t, [1, 1])
    with pytest.raises(ValueError, match="table_t must be int64"):
        torch.ops.effssl_kernels._tile_conv_triton(x, w, b, table, table_t[:1], [1, 1])
    go = torch.randn(table.shape[0], 4, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="table must be int64"):
        torch.ops.effssl_kernels._tile_conv_wgrad_triton(go, x, table[:1], table_t, 3, 3, [1, 1])


def test_table_out_of_range_raises(monkeypatch):
    # An entry outside [0, M + 2) (not a source pixel nor one of the two sentinels) is refused on
    # the host: always for CPU tensors, with EFFSSL_CHECK_INDICES=1 for CUDA ones (the kernels
    # would read it as a zero, a plausible wrong answer).
    monkeypatch.setenv("EFFSSL_CHECK_INDICES", "1")
    x, w, b, table, table_t = _case(N=1, Hb=2, Wb=2, C=3, CO=4)
    M = x.shape[0] * x.shape[2] * x.shape[3]
    assert int(table.max()) == M + 1  # the outside sentinel is legal
    tile_conv(x, w, b, table, table_t)
    for v in (-5, -1, M + 2, 1000):
        for which in (0, 1):
            tabs = [table.clone(), table_t.clone()]
            tabs[which][0, 0, 0] = v
            with pytest.raises(ValueError, match=rf"tile_conv: the table holds {v}, outside \[0, {M + 2}\)"):
                tile_conv(x, w, b, *tabs)


def test_empty_and_all_removed():
    mask = BlockMask(torch.zeros(2, 2, 2, dtype=torch.bool, device=DEVICE), 8, (16, 16))
    idx = TileIndex.from_mask(mask, (1, 1))
    x = torch.randn(0, 4, 8, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, device=DEVICE, requires_grad=True)
    y = tile_conv(x, w, None, idx.halo_table((1, 1, 1, 1)), idx.halo_table((1, 1, 1, 1)))
    assert y.shape == (0, 3, 8, 8)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_sparse_path_without_channels_answers_as_conv2d(monkeypatch, calls):
    # tile_conv refuses C = 0 or C_out = 0; under EFFSSL_TILE_CONV=implicit such a conv takes
    # the cudnn path and answers whatever F.conv2d answers (the masked dense reference's)
    monkeypatch.setenv("EFFSSL_TILE_CONV", "implicit")
    mask = random_mask(1, 16, 16, 8, seed=1, device=DEVICE)
    x, w, b = torch.randn(1, 0, 16, 16, device=DEVICE), torch.randn(4, 0, 3, 3, device=DEVICE), torch.randn(4)
    y = sparse_conv2d(x, w, b.to(DEVICE), 1, 1, mask=mask)
    assert not calls
    ref = masked_conv2d_reference(x, w, b.to(DEVICE), 1, 1, mask=mask)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref)
    w = torch.randn(0, 3, 3, 3, device=DEVICE)  # no output channels: F.conv2d's own error
    with pytest.raises(RuntimeError, match="expected weight to be at least 1 at dimension 0"):
        sparse_conv2d(torch.randn(1, 3, 16, 16, device=DEVICE), w, None, 1, 1, mask=mask)
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_path_with_implicit_gemm_matches_masked_dense(monkeypatch, calls, dtype):
    # EFFSSL_TILE_CONV=implicit: sparse_conv2d (dense in/out) and sparse_conv2d_packed route
    # stride-1 k > 1 convs through tile_conv; strided and 1x1 convs keep the cuDNN path.
    monkeypatch.setenv("EFFSSL_TILE_CONV", "implicit")
    mask = random_mask(2, 32, 24, 8, seed=2, device=DEVICE)
    for k, stride, pad, used in ((3, 1, 1, True), (3, 2, 1, False), (1, 1, 0, False)):
        x = torch.randn(2, 6, 16, 12).to(dtype).to(DEVICE).requires_grad_()
        w = (torch.randn(5, 6, k, k) / 6).to(dtype).to(DEVICE).requires_grad_()
        calls.clear()
        y = sparse_conv2d(x, w, None, stride, pad, mask=mask, in_stride=2)
        assert bool(calls) == used
        xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        ref = masked_conv2d_reference(xr, wr, None, stride, pad, mask=mask, in_stride=2)
        torch.testing.assert_close(y.float(), ref, **TOL[dtype])
        go = torch.randn_like(ref)
        gx, gw = torch.autograd.grad(y, (x, w), go.to(dtype))
        rx, rw = torch.autograd.grad(ref, (xr, wr), go)
        torch.testing.assert_close(gx.float(), rx, **TOL[dtype])
        torch.testing.assert_close(gw.float(), rw, **TOL[dtype])
        pm = mask.pixel_mask(2, x.shape[-2:]).expand_as(x)
        assert torch.all(gx[~pm] == 0)  # removed inputs get no gradient
    idx = TileIndex.from_mask(mask, (2, 2))
    tiles = pack(torch.randn(2, 6, 16, 12, device=DEVICE).to(dtype), idx)
    calls.clear()
    sparse_conv2d_packed(tiles, torch.randn(5, 6, 3, 3).to(dtype).to(DEVICE), None, 1, 1, mask=mask, in_stride=2)
    assert calls == [1]


def test_autocast_casts_like_conv2d(monkeypatch, calls):
    # float32 tiles and weight under autocast: cast to the autocast dtype first, as F.conv2d's
    # inputs are, so the output is bfloat16 like the cuDNN path's
    monkeypatch.setenv("EFFSSL_TILE_CONV", "implicit")
    mask = random_mask(1, 16, 16, 8, seed=4, device=DEVICE)
    idx = TileIndex.from_mask(mask, (1, 1))
    tiles = pack(torch.randn(1, 4, 16, 16, device=DEVICE), idx)
    w = torch.randn(3, 4, 3, 3, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = sparse_conv2d_packed(tiles, w, None, 1, 1, mask=mask)
        assert calls == [1]
        monkeypatch.setenv("EFFSSL_TILE_CONV", "cudnn")
        want = sparse_conv2d_packed(tiles, w, None, 1, 1, mask=mask)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), **TOL[torch.bfloat16])
    # backward outside autocast: gradients in the leaves' dtype, like the cudnn path's
    grads = {}
    for choice in ("implicit", "cudnn"):
        monkeypatch.setenv("EFFSSL_TILE_CONV", choice)
        t, wl = tiles.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = sparse_conv2d_packed(t, wl, None, 1, 1, mask=mask)
        grads[choice] = torch.autograd.grad(y.float().square().sum(), (t, wl))
    for g, r in zip(grads["implicit"], grads["cudnn"]):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, atol=0.05 * r.abs().max().item(), rtol=0.05)


def test_sparsified_resnet_same_with_implicit_gemm(monkeypatch, calls):
    # A converted CIFAR ResNet (BasicBlocks, 3x3 stride-1 stem) trains the same step with
    # EFFSSL_TILE_CONV=implicit as with cudnn: outputs, input and weight gradients.
    torchvision = pytest.importorskip("torchvision")
    from effssl_kernels.nn import resnet as R
    from torchvision.models.resnet import BasicBlock, ResNet

    m = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4, width_per_group=64)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    for mod in m.modules():  # narrow the model so the interpreter is quick
        if isinstance(mod, nn.Conv2d):
            mod.weight.data = mod.weight.data[:8, : min(8, mod.in_channels)].clone()
            mod.in_channels, mod.out_channels = min(8, mod.in_channels), 8
        elif isinstance(mod, nn.BatchNorm2d):
            mod.__init__(8)
    m.fc = nn.Linear(8, 4)
    del torchvision
    x = torch.randn(1, 3, 16, 16)
    keep = torch.tensor([[[True, False], [True, True]]])
    outs = {}
    for choice in ("cudnn", "implicit"):
        calls.clear()
        monkeypatch.setenv("EFFSSL_TILE_CONV", choice)
        model = R.sparsify(copy.deepcopy(m)).train().to(DEVICE)
        xi = x.clone().to(DEVICE).requires_grad_()
        with R.block_mask(keep.to(DEVICE), 8):
            y = model(xi)
        y.square().sum().backward()
        outs[choice] = (y, xi.grad, model.layer1[0].conv2.weight.grad, model.conv1.weight.grad)
        # the stem and the stride-1 3x3 convs of each stage (the first of layer 2-4 is strided)
        assert len(calls) == (6 if choice == "implicit" else 0)
    for a, b in zip(outs["cudnn"], outs["implicit"]):
        # float32 sums in another order, through BatchNorms over a few kept pixels: ~2e-5 of
        # the largest value (a wrong halo or tap would be of the order of the values)
        torch.testing.assert_close(a, b, atol=1e-4 * a.abs().max().item(), rtol=1e-4)


# the fakes' shapes per axis (a non-square kernel, dilation (3, 1)) and dtypes (audit 80: a fake
# reading the wrong axis's dilation, or a fixed dtype, passed the float32 square case)
@pytest.mark.parametrize("geom,dtype", [(GEOMETRY[0], torch.float32), (GEOMETRY[5], torch.float32),
                                        (GEOMETRY[0], torch.bfloat16)], ids=str)
def test_opcheck(geom, dtype):
    k, halo, dil, in_stride = geom
    x, w, b, table, table_t = _case(N=1, Hb=2, Wb=2, C=3, CO=4, k=k, halo=halo, in_stride=in_stride, dtype=dtype)
    x.requires_grad_()
    w.requires_grad_()
    ops = torch.ops.effssl_kernels
    torch.library.opcheck(ops._tile_conv_triton, (x, w, b, table, table_t, list(dil)))
    go = torch.randn(table.shape[0], 4, x.shape[2], x.shape[3], device=DEVICE).to(dtype)
    torch.library.opcheck(ops._tile_conv_wgrad_triton,
                          (go.requires_grad_(), x, table, table_t, w.shape[2], w.shape[3], list(dil)))


def test_compile_fullgraph(monkeypatch, calls):
    monkeypatch.setenv("EFFSSL_TILE_CONV", "implicit")
    mask = random_mask(2, 16, 16, 8, seed=3, device=DEVICE)
    idx = TileIndex.from_mask(mask, (1, 1))
    tiles = pack(torch.randn(2, 4, 16, 16, device=DEVICE), idx).requires_grad_()
    w = torch.randn(3, 4, 3, 3, device=DEVICE, requires_grad=True)

    def f(t, w):
        return sparse_conv2d_packed(t, w, None, 1, 1, mask=mask)

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(tiles, w)
    assert calls  # traced through the implicit path
    torch.testing.assert_close(y, f(tiles, w))
    y.sum().backward()
    assert tiles.grad is not None and w.grad is not None


def test_bad_inputs(monkeypatch):
    x, w, b, table, table_t = _case(N=1, Hb=2, Wb=2, C=3, CO=4)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        tile_conv(x.double(), w.double(), None, table, table_t)
    with pytest.raises(TypeError, match="share"):
        tile_conv(x, w.half(), None, table, table_t)
    with pytest.raises(ValueError, match="input channels"):
        tile_conv(x[:, :2], w, None, table, table_t)
    with pytest.raises(ValueError, match="bias"):
        tile_conv(x, w, b[:2], table, table_t)
    with pytest.raises(ValueError, match=r"bias must be None or a \[4\] torch.float32 tensor"):
        tile_conv(x, w, b.half(), table, table_t)  # the kernel would add it in another dtype
    with pytest.raises(ValueError, match="table must be int64"):
        tile_conv(x, w, b, table[:, 1:], table_t)
    with pytest.raises(ValueError, match="table_t must be int64"):
        tile_conv(x, w, b, table, table_t.int())
    with pytest.raises(ValueError, match="dilation"):
        tile_conv(x, w, b, table, table_t, (0, 1))
    with pytest.raises(TypeError, match="tile_conv: dilation must be a pair of ints"):
        tile_conv(x, w, b, table, table_t, 2)
    # no channels: F.conv2d answers [T, 0, ...] even with C_out > 0 (a torch quirk), the kernel
    # would answer the bias; the op refuses rather than pick one silently
    with pytest.raises(ValueError, match="at least one input and one output channel"):
        tile_conv(x[:, :0], w[:, :0], b, table, table_t)
    with pytest.raises(ValueError, match="at least one input and one output channel"):
        tile_conv(x, w[:0], None, table, table_t)
    monkeypatch.setenv("EFFSSL_TILE_CONV", "winograd")
    mask = random_mask(1, 16, 16, 8)
    with pytest.raises(ValueError, match="EFFSSL_TILE_CONV"):
        sparse_conv2d(torch.randn(1, 3, 16, 16), torch.randn(4, 3, 3, 3), padding=1, mask=mask)


def test_sparse_path_grouped_conv_keeps_the_cudnn_path(monkeypatch, calls):
    # the implicit GEMM has no groups: a grouped stride-1 3x3 conv stays on F.conv2d
    monkeypatch.setenv("EFFSSL_TILE_CONV", "implicit")
    mask = random_mask(2, 32, 24, 8, seed=3, device=DEVICE)
    x = torch.randn(2, 6, 16, 12, device=DEVICE)
    w = torch.randn(4, 3, 3, 3, device=DEVICE) / 3
    y = sparse_conv2d(x, w, None, 1, 1, 1, 2, mask=mask, in_stride=2)
    assert not calls
    ref = masked_conv2d_reference(x, w, None, 1, 1, 1, 2, mask=mask, in_stride=2)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])


@pytest.mark.parametrize("k", [2, (2, 3)])
def test_sparse_path_implicit_gemm_with_an_asymmetric_halo(monkeypatch, calls, k):
    # 'same' with an even kernel: halo (0, 1, 0, 1) / (1, 1, 0, 1), so the backward's table
    # (mirrored) differs from the forward's
    monkeypatch.setenv("EFFSSL_TILE_CONV", "implicit")
    mask = random_mask(2, 32, 24, 8, seed=4, device=DEVICE)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(2, 6, 16, 12, device=DEVICE, requires_grad=True)
    w = (torch.randn(5, 6, kh, kw, device=DEVICE) / 5).requires_grad_()
    y = sparse_conv2d(x, w, None, 1, "same", mask=mask, in_stride=2)
    assert calls == [1]
    ref = masked_conv2d_reference(x, w, None, 1, "same", mask=mask, in_stride=2)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])
    go = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(y, (x, w), go), torch.autograd.grad(ref, (x, w), go)):
        torch.testing.assert_close(g, r, **TOL[torch.float32])


def test_strided_bias_and_non_contiguous_tables():
    # a bias that is a strided view (a slice of a wider parameter) and tables that are views with
    # other strides: the launcher hands the kernel contiguous copies (it indexes them flat)
    x, w, b, table, table_t = _case(k=2, halo=(0, 1, 0, 1))
    wide = torch.zeros(2 * b.shape[0], dtype=b.dtype, device=DEVICE)
    wide[::2] = b
    tab, tab_t = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (table, table_t))
    assert not wide[::2].is_contiguous() and not tab.is_contiguous() and torch.equal(tab, table)
    ref = tile_conv_reference(x.cpu(), w.cpu(), b.cpu(), table.cpu())
    torch.testing.assert_close(tile_conv(x, w, wide[::2], table, table_t).cpu(), ref, **TOL[torch.float32])
    go = torch.randn(table.shape[0], w.shape[0], x.shape[2], x.shape[3]).to(DEVICE)
    got = _grads(tile_conv, x, w, b, tab, tab_t, go)
    want = _grads(tile_conv_reference, x.cpu(), w.cpu(), b.cpu(), table.cpu(), table_t.cpu(), go.cpu())
    for g, r in zip(got, want):
        torch.testing.assert_close(g.cpu(), r, **TOL[torch.float32])


@pytest.mark.skipif(HAS_GPU, reason="the GPU runs these tiles in every test")
def test_gpu_tile_sizes_of_a_small_map_under_the_interpreter(monkeypatch):
    # under 128 output rows, C_out < 64, C < 32: the GPU launchers round BLOCK_M / BLOCK_N /
    # BLOCK_C up to powers of two (tl.arange needs them); 24 rows, 7 output channels, 5 inputs
    import effssl_kernels.triton.tile_conv as ttc

    seen = gpu_tile_choices(monkeypatch, ttc, ("_fwd_tiles", "_wgrad_tiles"))
    x, w, b, table, table_t = _case(N=1, Hb=3, Wb=3, B=8, in_stride=4, C=5, CO=7)  # 2 x 2 tiles
    assert x.shape[0] * 4 == 24
    go = torch.randn(table.shape[0], 7, 2, 2).to(DEVICE)
    got = _grads(tile_conv, x, w, b, table, table_t, go)
    ref = _grads(tile_conv_reference, x, w, b, table, table_t, go)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **TOL[torch.float32])
    assert seen[0] == (32, 16, 16, 4, 1), seen
    assert (64, 16, 16, 8, 3) in seen, seen


def test_tensors_on_two_devices_are_refused():
    x, w, b, table, table_t = _case(N=1, Hb=2, Wb=2, C=3, CO=4)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        tile_conv(x, w.to("meta"), None, table, table_t)
