"""halo_gather op (C++ CPU kernel; Triton under TRITON_INTERPRET=1 or on a GPU) against the
plain-PyTorch reference (which reads the same tables): every dtype, strided and channels-last
tiles, outside fills, gradients (deterministic gather backward), gradcheck, opcheck, bad tables.
The tables themselves are checked against tiles cut from the dense masked map in
test_sparse_conv.py (test_halo_gather_matches_dense, test_pack_unpack_roundtrip)."""
import pytest
import torch

from effssl_kernels.ops.halo_gather import halo_gather_backward_op, halo_gather_op
from effssl_kernels.reference.halo_gather import halo_gather_reference
from effssl_kernels.sparse import TileIndex, pack, tiles
from utils import HAS_GPU, INTERPRET, random_mask

ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Forward is a copy: exact. Gradients: float32 (float64) sums of at most a few values rounded once.
GRAD_TOL = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-12, 1e-12),
            torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


@pytest.fixture
def triton_dev(monkeypatch):
    """The Triton backend, on the GPU where there is one, else under the interpreter: the device."""
    pytest.importorskip("triton")
    monkeypatch.setenv("EFFSSL_BACKEND", "triton")
    return "cuda" if HAS_GPU else "cpu"


def _case(stride=2, halo=1, seed=0, C=5, dtype=torch.float32, layout="contiguous", N=2,
          hw=(32, 24), B=8):
    mask = random_mask(N, *hw, B, p=0.6, seed=seed)
    idx = TileIndex.from_mask(mask, stride)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, *idx.size, generator=g, dtype=torch.float64)
    tiles = pack(x, idx).to(dtype)
    if layout == "channels_last":
        tiles = tiles.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other channel of a wider tensor
        wide = torch.randn(tiles.shape[0], 2 * C, *tiles.shape[2:], dtype=dtype)
        wide[:, ::2] = tiles
        tiles = wide[:, ::2]
    elif layout == "transposed":  # rows and columns swapped in memory
        tiles = torch.empty(tiles.shape[0], C, tiles.shape[3], tiles.shape[2],
                            dtype=dtype).transpose(2, 3).copy_(tiles)
    elif layout == "expanded":  # one channel read C times (stride 0)
        tiles = tiles[:, :1].expand(-1, C, -1, -1)
    table = idx.halo_table(halo)
    order, offsets = idx.halo_inverse(halo)
    return tiles, table, order, offsets, idx


def _layout(g, layout):
    """``g``'s values in memory laid out as ``layout`` (a view with those strides)."""
    if layout == "channels_last":
        return g.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return g.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "strided":  # every other row of a taller tensor, offset by one
        tall = torch.zeros(g.shape[0], g.shape[1], 2 * g.shape[2] + 1, g.shape[3], dtype=g.dtype)
        tall[:, :, 1::2] = g
        return tall[:, :, 1::2]
    return g.contiguous()


def _check(tiles, table, order, offsets, outside=0.0, grad_layout="contiguous"):
    t = tiles.detach().requires_grad_(True)  # as given: the op's layout handling is under test
    r = tiles.detach().clone().requires_grad_(True)
    got = halo_gather_op(t, table, order, offsets, outside)
    want = halo_gather_reference(r, table, outside)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)
    g = _layout(torch.randn(want.shape, dtype=torch.float64).to(tiles.dtype), grad_layout)
    gt, = torch.autograd.grad(got, t, g)
    gr, = torch.autograd.grad(want.double(), r, g.double())  # float64 sums
    rtol, atol = GRAD_TOL[tiles.dtype]
    torch.testing.assert_close(gt.double(), gr.double(), rtol=rtol, atol=atol)
    return got, gt


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "transposed", "expanded"])
def test_cpu_matches_reference(dtype, layout):
    _check(*_case(dtype=dtype, layout=layout)[:4])


@pytest.mark.parametrize("grad_layout", ["channels_last", "transposed", "strided"])
@pytest.mark.parametrize("stride,halo", [(1, 1), (4, (1, 0, 2, 1))])
def test_cpu_gradient_layouts(grad_layout, stride, halo):
    """The backward reads the output gradient through its strides unless channels last."""
    _check(*_case(stride=stride, halo=halo, C=3)[:4], grad_layout=grad_layout)


@pytest.mark.parametrize("stride,halo", [(1, 1), (2, (2, 1)), (4, (1, 0, 2, 1)), (4, 3), (8, 2),
                                         (4, 5)])
@pytest.mark.parametrize("outside", [0.0, float("-inf")])
def test_cpu_halos_and_fills(stride, halo, outside):
    tiles, table, order, offsets, idx = _case(stride=stride, halo=halo, seed=stride)
    got, _ = _check(tiles, table, order, offsets, outside)
    if outside != 0:
        assert torch.isinf(got).any()


def test_cpu_empty_and_all_removed():
    keep = torch.zeros(2, 4, 3, dtype=torch.bool)
    from effssl_kernels.masks import BlockMask
    idx = TileIndex.from_mask(BlockMask(keep, 8, (32, 24)), 2)
    tiles = torch.randn(0, 3, 4, 4, requires_grad=True)
    out = halo_gather_op(tiles, idx.halo_table(1), *idx.halo_inverse(1))
    assert out.shape == (0, 3, 6, 6)
    out.sum().backward()
    assert tiles.grad.shape == tiles.shape


def _ordered_sum(g, order, offsets, tile_shape):
    """The backward's documented order, in g's dtype: per source pixel ``s``, its readers
    ``order[offsets[s]:offsets[s + 1]]`` added one by one to zero (adding exact zeros where a
    run has ended keeps the bits)."""
    T, bh, bw = tile_shape
    C = g.shape[1]
    rows = g.permute(0, 2, 3, 1).reshape(-1, C)  # padded pixel q at row q
    lo, cnt = offsets[:-1], offsets[1:] - offsets[:-1]
    acc = torch.zeros(T * bh * bw, C, dtype=g.dtype)
    for j in range(int(cnt.max())):
        q = order[(lo + j).clamp(max=order.numel() - 1)]
        acc = acc + torch.where((j < cnt)[:, None], rows[q], torch.zeros((), dtype=g.dtype))
    return acc.view(T, bh, bw, C).permute(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_backward_is_deterministic(dtype):
    """Bit-equal to a fixed-order float32 sum (rounded once to ``dtype``: half gradients are
    summed in float32) with 1 and with 2 threads (set explicitly: under OMP_NUM_THREADS=1 the
    default is one thread). Up to 3 readers per pixel of random values, so another summation
    order or a half-precision sum would show in the last bits."""
    tiles, table, order, offsets, _ = _case(stride=1, halo=3, C=33, dtype=dtype)
    tiles.requires_grad_(True)
    g = torch.randn(tiles.shape[0], 33, *table.shape[1:]).to(dtype)
    want = _ordered_sum(g.float(), order, offsets, (tiles.shape[0], *tiles.shape[2:])).to(dtype)
    assert (offsets[1:] - offsets[:-1]).max() >= 3 and tiles.shape[0] * 64 > 2 * 4096 // 33
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):  # 2: at least two chunks of at::parallel_for's grain
            torch.set_num_threads(n)
            got = torch.autograd.grad(halo_gather_op(tiles, table, order, offsets), tiles, g)[0]
            assert torch.equal(got, want)
    finally:
        torch.set_num_threads(threads)


def test_gradcheck_float64():
    tiles, table, order, offsets, _ = _case(stride=2, halo=(1, 2), C=2, dtype=torch.float64,
                                            hw=(16, 16), B=8)
    tiles.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: halo_gather_op(t, table, order, offsets, -2.0), (tiles,))


@pytest.mark.parametrize("which", ["halo", "pack", "unpack"])
def test_gradgradcheck_float64(which):
    """Double backward (create_graph=True) through the backward op: it must be the forward
    gather again, not the zeros autograd's fallback gives an op without a formula."""
    tiles, table, order, offsets, idx = _case(stride=2, halo=(1, 2), C=2, dtype=torch.float64,
                                              N=1, hw=(8, 8), B=4)
    if which == "pack":  # R != T: the dense map is the source
        tiles = torch.randn(1, 2, *idx.size, dtype=torch.float64)
        table, order, offsets = idx.pack_tables()
    elif which == "unpack":  # entries read the zero row
        table, order, offsets = idx.unpack_tables()
    tiles.requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda t: halo_gather_op(t, table, order, offsets, -2.0), (tiles,))


def test_opcheck():
    tiles, table, order, offsets, _ = _case(C=3)
    tiles.requires_grad_(True)
    torch.library.opcheck(torch.ops.effssl_kernels.halo_gather.default,
                          (tiles, table, order, offsets, 0.0))
    torch.library.opcheck(torch.ops.effssl_kernels.halo_gather.default,
                          (tiles.detach().bfloat16(), table, order, offsets, float("-inf")))
    g = torch.randn(tiles.shape[0], 3, *table.shape[1:])
    torch.library.opcheck(torch.ops.effssl_kernels.halo_gather_backward.default,
                          (g, order, offsets, tiles.shape[0], 4, 4))
    torch.library.opcheck(torch.ops.effssl_kernels.halo_gather_backward.default,
                          (g.requires_grad_(True), order, offsets, tiles.shape[0], 4, 4),
                          test_utils=("test_schema", "test_autograd_registration"))


def test_bad_table_raises():
    tiles, table, order, offsets, _ = _case()
    bad = table.clone()
    bad[0, 0, 0] = tiles.shape[0] * 16 + 2  # past the outside row
    with pytest.raises(RuntimeError, match="table entry"):
        halo_gather_op(tiles, bad, order, offsets)
    with pytest.raises(RuntimeError, match="3-D"):
        halo_gather_op(tiles, table[0], order, offsets)
    with pytest.raises(RuntimeError, match="int64"):
        halo_gather_op(tiles, table.int(), order, offsets)
    with pytest.raises(RuntimeError, match="table entry"):  # no channel to copy: still checked
        halo_gather_op(tiles[:, :0], bad, order, offsets)
    with pytest.raises(TypeError, match="tiles must be float32, float64, float16 or bfloat16, got Long"):
        halo_gather_op(tiles.long(), table, order, offsets)


# ----------------------------------------------------------------------------- Triton
triton_only = pytest.mark.skipif(not (HAS_GPU or INTERPRET),
                                 reason="needs a CUDA device or TRITON_INTERPRET=1")


@triton_only
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stride,halo,outside", [(2, 1, 0.0), (4, (1, 0, 2, 1), float("-inf")),
                                                 (8, 2, 0.0)])
def test_triton_matches_reference(triton_dev, dtype, stride, halo, outside):
    tiles, table, order, offsets, _ = _case(stride=stride, halo=halo, C=3, dtype=dtype,
                                            layout="strided", N=1, hw=(16, 24))
    args = [a.to(triton_dev) for a in (tiles, table, order, offsets)]
    _check(*args, outside=outside)


@triton_only
@pytest.mark.triton
def test_triton_bad_table_or_runs_give_nan(triton_dev):
    # The Triton path does not check its index tensors on CUDA (a host sync): an entry outside
    # [0, S + 2) reads as NaN, never as a neighbour, a zero or the fill; so does a made-up run of
    # the backward (past the end of order, or an order entry past the padded tiles)
    dev = triton_dev
    T, C = 2, 3
    S = T * 16
    tiles = torch.rand(T, C, 4, 4, device=dev)
    table = torch.tensor([[[0, S, S + 1], [S + 2, 10**6, -1]]], device=dev)
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    out = halo_gather_op(tiles, table, empty, torch.zeros(S + 1, dtype=torch.int64, device=dev), outside=-5.0)
    assert torch.equal(out[0, :, 0].cpu(), torch.stack([tiles[0, :, 0, 0].cpu(), torch.zeros(C),
                                                        torch.full((C,), -5.0)], 1))
    assert torch.isnan(out[0, :, 1]).all()
    grad = torch.ones(1, 2, 2, 2, device=dev)
    for order, offsets in (([0, 1, 2, 3], [0, 1, 2, 3, 6]),  # the last run passes order's end
                           ([0, 1, 2, 9], [0, 1, 2, 3, 4])):  # order entry 9 >= Q = 4
        g = halo_gather_backward_op(grad, torch.tensor(order, device=dev), torch.tensor(offsets, device=dev), 1, 2, 2)
        assert torch.isfinite(g[0, :, 0, 0]).all() and torch.isnan(g[0, :, 1, 1]).all(), (order, offsets)


@triton_only
@pytest.mark.triton
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_float64_fill_is_exact(monkeypatch, backend):
    # a float64 fill that float32 cannot hold (Triton passes Python floats as float32)
    if backend == "cpp" and HAS_GPU:
        pytest.skip("the C++ kernel runs CPU tensors")
    monkeypatch.setenv("EFFSSL_BACKEND", backend)
    dev = "cuda" if HAS_GPU else "cpu"
    tiles, table, order, offsets, _ = _case(stride=2, halo=1, C=3, dtype=torch.float64, layout="strided", N=1,
                                            hw=(16, 24))
    got, _ = _check(*[a.to(dev) for a in (tiles, table, order, offsets)], outside=0.1)
    assert (got == 0.1).any()  # the fill is there, exactly


@triton_only
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_triton_second_channel_block(triton_dev, dtype, layout):
    """C = 130 > BLOCK_C = 128: a second program along the channels (program_id(1) = 1),
    forward and backward, with masked channel lanes in it."""
    tiles, table, order, offsets, _ = _case(stride=8, halo=(1, 0, 2, 1), C=130, dtype=dtype,
                                            layout=layout, N=1, hw=(16, 24))
    _check(*[a.to(triton_dev) for a in (tiles, table, order, offsets)], outside=-1.5)


@triton_only
@pytest.mark.triton
def test_triton_opcheck(monkeypatch):
    pytest.importorskip("triton")
    dev = "cuda" if HAS_GPU else "cpu"
    tiles, table, order, offsets, _ = _case(C=2, N=1, hw=(16, 16))
    args = (tiles.to(dev).requires_grad_(True), table.to(dev), order.to(dev), offsets.to(dev),
            0.0)
    torch.library.opcheck(torch.ops.effssl_kernels._halo_gather_triton.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@triton_only
@pytest.mark.triton
def test_triton_gradgradcheck_float64(triton_dev):
    tiles, table, order, offsets, _ = _case(stride=2, halo=1, C=2, dtype=torch.float64, N=1,
                                            hw=(8, 4), B=4, seed=3)
    tiles, table, order, offsets = (a.to(triton_dev) for a in (tiles, table, order, offsets))
    tiles.requires_grad_(True)
    assert tiles.shape[0] > 1  # some halo pixels read another tile
    # fast mode (random projections): a few interpreted launches instead of one per element
    assert torch.autograd.gradgradcheck(
        lambda t: halo_gather_op(t, table, order, offsets, 3.0), (tiles,), fast_mode=True)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(B=st.sampled_from([1, 2, 4, 8]), s=st.sampled_from([1, 2, 4]), gh=st.integers(1, 4),
       gw=st.integers(1, 4), halo=st.tuples(*[st.integers(0, 5)] * 4), C=st.integers(1, 9),
       p=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       outside=st.sampled_from([0.0, float("-inf"), 3.5]))
@settings(max_examples=60, deadline=None, derandomize=True)
def test_fuzz_cpu_matches_reference(B, s, gh, gw, halo, C, p, seed, outside):
    if B % s:
        return
    mask = random_mask(2, gh * B, gw * B, B, p=p, seed=seed)
    idx = TileIndex.from_mask(mask, s)
    x = torch.randn(2, C, *idx.size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _check(pack(x, idx), idx.halo_table(halo), *idx.halo_inverse(halo), outside=outside)


@triton_only
@pytest.mark.triton
def test_triton_pack_unpack_match_cpu(monkeypatch):
    """pack and unpack are halo_gathers with other tables (R != T): the Triton kernel too."""
    pytest.importorskip("triton")
    from effssl_kernels.sparse import unpack

    dev = "cuda" if HAS_GPU else "cpu"
    mask = random_mask(2, 16, 24, 8, p=0.5, seed=12)
    idx_cpu = TileIndex.from_mask(mask, 2)
    x = torch.randn(2, 3, *idx_cpu.size, dtype=torch.float64, requires_grad=True)
    want_t = pack(x, idx_cpu)
    want_d = unpack(want_t, idx_cpu, x.shape)
    gw, = torch.autograd.grad(want_d, x, torch.ones_like(want_d))
    monkeypatch.setenv("EFFSSL_BACKEND", "triton")
    idx = TileIndex.from_mask(mask.to(dev), 2)
    xd = x.detach().to(dev).requires_grad_(True)
    got_t = pack(xd, idx)
    got_d = unpack(got_t, idx, x.shape)
    gg, = torch.autograd.grad(got_d, xd, torch.ones_like(got_d))
    assert torch.equal(got_t.cpu(), want_t.detach()) and torch.equal(got_d.cpu(), want_d.detach())
    assert torch.equal(gg.cpu(), gw)


@pytest.mark.parametrize("backend", ["cpp"] + (["triton"] if (HAS_GPU or INTERPRET) else []))
def test_non_square_tiles_and_halo_gradients(monkeypatch, backend):
    # 4 x 8 tiles (in_stride (2, 1)) and a halo with ph != pw: the backward's tile shape per axis
    if backend == "triton":
        pytest.importorskip("triton")
        if HAS_GPU:
            pytest.skip("covered by the CUDA run")
    monkeypatch.setenv("EFFSSL_BACKEND", backend)
    tiles, table, order, offsets, idx = _case(stride=(2, 1), halo=(1, 0, 2, 1), C=3)
    assert idx.tile == (4, 8)
    _check(tiles, table, order, offsets)


def test_opcheck_non_square_halo():
    # the fake's output [R, C, ph, pw] per axis: ph = 4 + 3 != pw = 4 + 1
    tiles, table, order, offsets, _ = _case(C=2, N=1, hw=(16, 16), halo=(1, 0, 2, 1))
    assert table.shape[1] != table.shape[2]
    torch.library.opcheck(torch.ops.effssl_kernels.halo_gather.default,
                          (tiles.requires_grad_(True), table, order, offsets, 0.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    if HAS_GPU or INTERPRET:
        torch.library.opcheck(torch.ops.effssl_kernels._halo_gather_triton.default,
                              (tiles, table, order, offsets, 0.0),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@triton_only
@pytest.mark.triton
def test_triton_non_contiguous_table(triton_dev):
    tiles, table, order, offsets, _ = _case(stride=4, halo=(1, 0, 2, 1), C=3, N=1, hw=(16, 24))
    view = table.transpose(1, 2).contiguous().transpose(1, 2)  # the same entries, other strides
    assert not view.is_contiguous() and torch.equal(view, table)
    _check(*[a.to(triton_dev) for a in (tiles, view, order, offsets)], outside=-1.5)


@triton_only
@pytest.mark.triton
def test_triton_backward_checks_the_inverse_sizes(triton_dev):
    # order longer than the padded pixels: refused as the C++ op refuses it, not read
    grad = torch.ones(1, 2, 2, 2, device=triton_dev)
    order, offsets = torch.arange(5, device=triton_dev), torch.tensor([0, 1, 2, 3, 5], device=triton_dev)
    with pytest.raises(ValueError, match="do not match 4 padded pixels"):
        halo_gather_backward_op(grad, order, offsets, 1, 2, 2)


@pytest.mark.parametrize("C", [2, 0])
def test_cpu_backward_checks_offsets_and_order_values(C):
    # the C++ backward op called directly with inverse tables whose values are bad (the Python
    # checks look at sizes only): refused, never read past order or grad; with C = 0 (nothing
    # summed) too, as the forward checks every index when nothing is copied (audit 96)
    bwd = torch.ops.effssl_kernels.halo_gather_backward
    grad = torch.ones(1, C, 2, 2)  # Q = 4 padded pixels; 1 tile of 2 x 2 -> S = 4
    with pytest.raises(RuntimeError, match="not a partition"):  # the last run ends past order
        bwd(grad, torch.arange(4), torch.tensor([0, 1, 2, 3, 5]), 1, 2, 2)
    with pytest.raises(RuntimeError, match="out of range"):  # a run of one reading pixel Q
        bwd(grad, torch.tensor([0, 1, 2, 4]), torch.tensor([0, 1, 2, 3, 4]), 1, 2, 2)
    assert bwd(grad, torch.arange(4), torch.arange(5), 1, 2, 2).shape == (1, C, 2, 2)


@pytest.mark.parametrize("extra", [-1, 1])
def test_tile_count_must_match_the_index(extra):
    mask = random_mask(2, 32, 32, 8, seed=6)
    idx = TileIndex.from_mask(mask, 2)
    t = torch.randn(idx.num_tiles + extra, 3, 4, 4)
    with pytest.raises(ValueError, match="does not match the index"):
        tiles.unpack(t, idx, (2, 3, 16, 16))
    with pytest.raises(ValueError, match="does not match the index"):
        tiles.halo_gather(t, idx, 1)


def test_pack_and_unpack_check_batch_and_channels():
    mask = random_mask(2, 32, 32, 8, seed=7)
    idx = TileIndex.from_mask(mask, 2)
    with pytest.raises(ValueError, match="does not match the index"):
        pack(torch.randn(3, 3, 16, 16), idx)  # one sample too many
    with pytest.raises(ValueError, match="does not match the index"):
        tiles.unpack(torch.randn(idx.num_tiles, 3, 4, 4), idx, (2, 5, 16, 16))  # 5 channels, tiles have 3
