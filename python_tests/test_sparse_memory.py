"""Training memory and work of the block-sparse path scale with the kept fraction.

The tiled conv and max pool save the un-halo'd tiles for backward and gather the halo again
there (effssl_kernels/sparse/halo_ops.py), so a sparsified ResNet saves about what the dense one
does at keep 1.0 and less with fewer blocks; its forward and backward FLOPs scale with keep.
Values: the Functions against F.conv2d / F.max_pool2d of the materialised halo (every backend
of the halo gather's adjoint), float64 gradcheck and gradgradcheck, autocast, torch.compile.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import effssl_kernels as ek
from effssl_kernels.ops.halo_gather import halo_gather_backward_op, halo_gather_op
from effssl_kernels.sparse import TileIndex, halo_gather, pack
from effssl_kernels.sparse.halo_ops import halo_conv2d, halo_max_pool2d
from utils import INTERPRET, random_mask

torchvision = pytest.importorskip("torchvision")


def _saved_bytes_and_flops(model, x, mask=None, ctx=None):
    """Unique non-parameter bytes autograd saves in forward (by storage), and forward /
    backward FLOPs, inside ``ctx`` (default ``block_mask(mask)``)."""
    saved = {}
    params = {p.data_ptr() for p in model.parameters()}

    def pack_hook(t):
        if t.numel() and t.data_ptr() not in params:
            saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with ek.block_mask(mask) if ctx is None else ctx:
        with FlopCounterMode(display=False) as fwd:
            with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
                out = model(x)
        with FlopCounterMode(display=False) as bwd:
            out.float().square().sum().backward()
    return sum(saved.values()), fwd.get_total_flops(), bwd.get_total_flops()


def _keep_mask(N, grid, frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(N, grid * grid, dtype=torch.bool)
    for n in range(N):
        keep[n, torch.randperm(grid * grid, generator=g)[:round(frac * grid * grid)]] = True
    return keep.view(N, grid, grid)


def test_resnet_saved_activations_and_flops_scale_with_keep():
    # 64 px, block 32: every layer of resnet18 runs on tiles (4 blocks per image). Before the
    # halo Functions the halo'd copies made keep 1.0 save 1.74x the dense model, keep 0.5 0.93x.
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(4, 3, 64, 64)
    dense = _saved_bytes_and_flops(model, x, None)
    ek.sparsify(model)
    for frac, bound in ((1.0, 1.15), (0.5, 0.65), (0.25, 0.42)):
        mask = ek.BlockMask(_keep_mask(4, 2, frac), 32, 64)
        model.zero_grad()
        saved, f_fwd, f_bwd = _saved_bytes_and_flops(model, x, mask)
        assert saved <= bound * dense[0], (frac, saved / dense[0])
        assert f_fwd <= (frac + 0.02) * dense[1], (frac, f_fwd / dense[1])
        assert f_bwd <= (frac + 0.02) * dense[2], (frac, f_bwd / dense[2])


def _case(stride=2, C=4, seed=0, dtype=torch.float64):
    mask = random_mask(2, 32, 24, 8, p=0.6, seed=seed)
    idx = TileIndex.from_mask(mask, stride)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, *idx.size, generator=g, dtype=torch.float64)
    return pack(x, idx).to(dtype), idx


CONVS = [  # (halo, conv stride, dilation, groups, bias)
    ((1, 1, 1, 1), (1, 1), (1, 1), 1, True),
    ((1, 0, 1, 0), (2, 2), (1, 1), 1, False),   # a ResNet downsampling 3x3
    ((2, 2, 2, 2), (1, 1), (2, 2), 2, True),    # dilated, grouped
    ((3, 3, 3, 3), (2, 2), (1, 1), 1, True),    # a 7x7 stem at stride 2 reaches 3 px
]


@pytest.mark.parametrize("halo,stride,dilation,groups,bias", CONVS)
def test_halo_conv_matches_materialised_halo_and_saves_no_copy(halo, stride, dilation, groups, bias):
    tiles, idx = _case(stride=1 if stride == (1, 1) else 2)
    k = 3 if halo[0] < 3 else 7
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4 // groups, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64) if bias else None
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (tiles, w, b)]
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        got = halo_conv2d(leaves[0], leaves[1], leaves[2], idx, halo, stride, dilation, groups)
    ref_leaves = [t.clone().requires_grad_() if t is not None else None for t in (tiles, w, b)]
    want = F.conv2d(halo_gather(ref_leaves[0], idx, halo), ref_leaves[1], ref_leaves[2], stride, 0,
                    dilation, groups)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    haloed = tuple(halo_gather(tiles, idx, halo).shape)
    assert haloed not in shapes and tuple(tiles.shape) in shapes, shapes
    go = torch.randn_like(want)
    got_g = torch.autograd.grad(got, [t for t in leaves if t is not None], go)
    want_g = torch.autograd.grad(want, [t for t in ref_leaves if t is not None], go)
    for a, e in zip(got_g, want_g):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_halo_conv_gradcheck_and_gradgradcheck_float64():
    tiles, idx = _case(stride=4, C=2)  # 2 x 2 tiles: gradgradcheck is quadratic in the size
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    t = tiles.clone().requires_grad_()

    def f(t, w, b):
        return halo_conv2d(t, w, b, idx, (1, 0, 1, 0), (2, 2), (1, 1), 1)

    assert torch.autograd.gradcheck(f, (t, w, b))
    assert torch.autograd.gradgradcheck(f, (t, w, b))


def test_halo_max_pool_matches_materialised_halo_and_gradchecks():
    tiles, idx = _case(stride=2)
    tiles[0, 0, 1, 1] = tiles[0, 0, 1, 2]  # a tie: the first maximum wins in both
    t = tiles.clone().requires_grad_()
    r = tiles.clone().requires_grad_()
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: shapes.append(tuple(x.shape)) or x, lambda x: x):
        got = halo_max_pool2d(t, idx, (1, 0, 1, 0), 3, 2, 1)
    want = F.max_pool2d(halo_gather(r, idx, (1, 0, 1, 0), outside=float("-inf")), 3, 2, 0, 1)
    assert torch.equal(got, want)
    assert tuple(halo_gather(tiles, idx, (1, 0, 1, 0)).shape) not in shapes
    go = torch.randn_like(want)
    assert torch.equal(torch.autograd.grad(got, t, go)[0], torch.autograd.grad(want, r, go)[0])
    small, sidx = _case(stride=4, C=1)
    s = small.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: halo_max_pool2d(s, sidx, 1, 3, 2, 1), (s,))
    assert torch.autograd.gradgradcheck(lambda s: halo_max_pool2d(s, sidx, 1, 3, 2, 1), (s,))


def test_halo_conv_under_autocast_is_the_convs_autocast():
    tiles, idx = _case(stride=1, dtype=torch.float32)
    w = torch.randn(6, 4, 3, 3)
    t, r = tiles.clone().requires_grad_(), tiles.clone().requires_grad_()
    wt, wr = w.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = halo_conv2d(t, wt, None, idx, 1, 1, 1, 1)
        want = F.conv2d(halo_gather(r, idx, 1), wr, None, 1, 0, 1, 1)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    go = torch.randn_like(want)
    gt, gw = torch.autograd.grad(got, (t, wt), go)
    rt, rw = torch.autograd.grad(want, (r, wr), go)
    assert gt.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gt, rt, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gw, rw, rtol=1e-2, atol=1e-2)


def test_halo_conv_compiles_fullgraph():
    tiles, idx = _case(stride=1, dtype=torch.float32)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)

    def f(t, w):
        return halo_conv2d(t, w, None, idx, 1, 1, 1, 1).square().sum()

    t1, t2 = tiles.clone().requires_grad_(), tiles.clone().requires_grad_()
    want = torch.autograd.grad(f(t1, w), (t1, w))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(t2, w), (t2, w))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


BACKENDS = ["cpp", "reference"] + (["triton"] if INTERPRET else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_halo_gather_backward_op_is_the_adjoint(monkeypatch, backend):
    # <halo(t), g> == <t, adjoint(g)> for every backend the Functions' backward may pick
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("EFFSSL_BACKEND", backend)
    tiles, idx = _case(stride=2)
    table = idx.halo_table((2, 1, 0, 3))
    order, offsets = idx.halo_inverse((2, 1, 0, 3))
    y = halo_gather_op(tiles, table, order, offsets, 0.0)
    g = torch.randn(y.shape, dtype=torch.float64)
    adj = halo_gather_backward_op(g, order, offsets, *tiles.shape[:1], *tiles.shape[2:])
    assert adj.shape == tiles.shape
    torch.testing.assert_close((y * g).sum(), (tiles * adj).sum(), rtol=1e-12, atol=1e-12)
    t = tiles.clone().requires_grad_()
    (auto,) = torch.autograd.grad(halo_gather_op(t, table, order, offsets, 0.0), t, g)
    torch.testing.assert_close(adj, auto, rtol=1e-12, atol=1e-12)


def test_halo_functions_forward_mode_and_vmap():
    # jvp (bilinear in tiles and weight; the pool's at its argmax) and vmap over a batch of weights
    fwAD = torch.autograd.forward_ad
    tiles, idx = _case(stride=2)
    halo = (1, 0, 1, 0)
    g = torch.Generator().manual_seed(2)
    w, dw = (torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    b, db = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(2))
    dt = torch.randn(tiles.shape, generator=g, dtype=torch.float64)

    def old(t, w, b=None):
        return F.conv2d(halo_gather(t, idx, halo), w, b, 2)

    _, got = torch.func.jvp(lambda t, w, b: halo_conv2d(t, w, b, idx, halo, 2, 1, 1), (tiles, w, b), (dt, dw, db))
    torch.testing.assert_close(got, old(dt, w) + old(tiles, dw) + db.view(1, -1, 1, 1), rtol=1e-12, atol=1e-12)
    with fwAD.dual_level():  # a weight tangent only, through the public packed conv
        mask = random_mask(2, 32, 24, 8, p=0.6, seed=0)  # _case's
        out = ek.sparse_conv2d_packed(tiles, fwAD.make_dual(w, dw), None, 2, 1, mask=mask, in_stride=2)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, old(tiles, dw), rtol=1e-12, atol=1e-12)

    def pool(t):
        return F.max_pool2d(halo_gather(t, idx, halo, outside=float("-inf")), 3, 2)

    _, gp = torch.func.jvp(lambda t: halo_max_pool2d(t, idx, halo, 3, 2, 1), (tiles,), (dt,))
    fd = (pool(tiles + 1e-6 * dt) - pool(tiles - 1e-6 * dt)) / 2e-6  # linear a.e.: exact up to rounding
    torch.testing.assert_close(gp, fd, rtol=1e-7, atol=1e-7)

    ws = torch.randn(3, 6, 4, 3, 3, generator=g, dtype=torch.float64)
    got = torch.func.vmap(lambda w: halo_conv2d(tiles, w, None, idx, halo, 2, 1, 1))(ws)
    torch.testing.assert_close(got, torch.stack([old(tiles, v) for v in ws]), rtol=1e-12, atol=1e-12)
    grads = torch.func.vmap(torch.func.grad(lambda w: halo_conv2d(tiles, w, None, idx, halo, 2, 1, 1).square().sum()))(ws)
    want = torch.stack([torch.func.grad(lambda w: old(tiles, w).square().sum())(v) for v in ws])
    torch.testing.assert_close(grads, want, rtol=1e-10, atol=1e-10)


def test_forward_mode_tangents_are_refused_not_dropped():
    # A custom op's autograd is reverse mode only: a tangent reaching one was silently dropped
    # (pack gave no tangent, jvp of sparse_conv2d in x gave 0). Now each op refuses it.
    fwAD = torch.autograd.forward_ad
    mask = random_mask(2, 16, 16, 8, p=0.6, seed=0)
    idx = TileIndex.from_mask(mask, 1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="halo_gather: forward-mode AD"):
            pack(dual, idx)
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            ek.sparse_conv2d(dual, w, None, 1, 1, mask=mask)
        tokens = fwAD.make_dual(torch.randn(2, 5, 3), torch.ones(2, 5, 3))
        with pytest.raises(NotImplementedError, match="gather_tokens: forward-mode AD"):
            ek.gather_tokens(tokens, torch.tensor([[0, 4], [1, 2]]))
        with pytest.raises(NotImplementedError, match="patch_embed_gather: forward-mode AD"):
            ek.patch_embed_gather(torch.randn(1, 3, 8, 8), fwAD.make_dual(torch.randn(4, 3, 4, 4), torch.ones(4, 3, 4, 4)),
                                  None, torch.tensor([[0, 3]]))
        pack(x, idx)  # a plain tensor inside a dual level is fine
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda x: ek.sparse_conv2d(x, w, None, 1, 1, mask=mask), (x,), (torch.ones_like(x),))


def test_tiles_changed_in_place_after_forward_raise_in_backward():
    # The Functions save the tiles themselves (as a dense conv saves its input): an in-place change
    # before backward is autograd's version-counter error, never a gradient of the changed tiles.
    tiles, idx = _case(stride=1, dtype=torch.float32)
    t = tiles.clone().requires_grad_()
    w = torch.randn(6, 4, 3, 3)
    for f in (lambda u: halo_conv2d(u, w, None, idx, 1, 1, 1, 1), lambda u: halo_max_pool2d(u, idx, 1, 3, 1, 1)):
        u = t * 1
        out = f(u)
        u.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_vit_token_path_flops_and_saved_activations_scale_with_keep():
    # FlopCounterMode had no formula for patch_embed_gather, so it counted the sparse ViT's
    # patch embedding as 0 (forward ratio 0.925 of dense with every token kept)
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=64, depth=2, embed_dim=96, num_heads=3,
                              num_classes=0)
    x = torch.randn(2, 3, 64, 64)

    dense = _saved_bytes_and_flops(model, x)
    ek.sparsify_vit(model)
    L = 16
    for K in (16, 8, 4):
        keep = ek.random_token_keep(2, L, K / L, multiple_of=1)
        got = _saved_bytes_and_flops(model, x, ctx=ek.token_keep(keep))
        frac = (K + 1) / (L + 1)  # the kept tokens and the class token
        assert K < L or got[1:] == dense[1:], (got, dense)
        assert 0.95 * frac * dense[1] <= got[1] <= 1.01 * frac * dense[1], (K, got, dense)
        assert got[2] <= 1.01 * frac * dense[2], (K, got, dense)
        # the image is saved whole (for the weight gradient, as timm's conv saves it)
        assert got[0] <= x.numel() * x.element_size() + 1.02 * frac * dense[0], (K, got[0] / dense[0])


def test_halo_conv_under_autocast_leaves_float64_alone():
    # autocast casts float32 conv inputs only: float64 tiles and weight stay float64
    tiles, idx = _case(stride=1)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = halo_conv2d(tiles, w, None, idx, 1, 1, 1, 1)
        want = F.conv2d(halo_gather(tiles, idx, 1), w, None, 1, 0, 1, 1)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_halo_max_pool_without_halo_keeps_dilation():
    tiles, idx = _case(stride=1)  # 8 x 8 tiles
    assert torch.equal(halo_max_pool2d(tiles, idx, 0, 3, 1, 2), F.max_pool2d(tiles, 3, 1, 0, 2))
