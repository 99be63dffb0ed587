"""block_match on the Triton path (EFFSSL_BACKEND=triton) against the reference.

On a GPU machine the kernel runs on CUDA tensors; elsewhere on CPU tensors under
TRITON_INTERPRET=1 (conftest.py), so shapes stay tiny. The kernel computes the direct float32 mse
and breaks exact ties by the reference's candidate order, so offsets are compared exactly.
"""
import pytest
import torch

pytest.importorskip("triton")

import effssl_kernels as ek  # noqa: E402
from effssl_kernels.reference import block_match_reference  # noqa: E402
from utils import DTYPES, HAS_GPU, INTERPRET, assert_block_match, make_layout  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (HAS_GPU or INTERPRET), reason="needs a CUDA device or TRITON_INTERPRET=1"),
]

DEVICE = "cuda" if HAS_GPU else "cpu"
I32_MIN, I32_MAX = -(2**31), 2**31 - 1


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("EFFSSL_BACKEND", "triton")


def _bm(a, b, B, r, **kw):
    """The public function on DEVICE; results back on the CPU."""
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    psnr, off = ek.block_match(a.to(DEVICE), b.to(DEVICE), B, r, **kw)
    assert psnr.device.type == DEVICE and off.device.type == DEVICE
    return psnr.cpu(), off.cpu()


def _shifted_pair(N, C, H, W, shifts, pad=4, dtype=torch.float32):
    """a, b cut from one random canvas so that a[n, :, y, x] == b[n, :, y + dy_n, x + dx_n]."""
    img = torch.rand(N, C, H + 2 * pad, W + 2 * pad)
    a = img[:, :, pad : pad + H, pad : pad + W]
    b = torch.stack([img[n, :, pad - dy : pad - dy + H, pad - dx : pad - dx + W] for n, (dy, dx) in enumerate(shifts)])
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


# ----------------------------------------------------------------------------- plumbing
def test_runs_the_triton_kernel(monkeypatch):
    # Guards every test below against a silent fall-back to another backend.
    import effssl_kernels.triton.block_match as tbm

    calls = []
    real = tbm.block_match_triton

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(tbm, "block_match_triton", spy)
    a, b = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    psnr, off = _bm(a, b, 4, 1)
    assert len(calls) == 1
    assert_block_match(psnr, off, a, b, 4, 1, exact_offsets=True)


def test_tile_sizes():
    from effssl_kernels.triton.block_match import _tile_sizes

    # main case (B=32, r=16): 33x33 candidates in tiles of 64 x 32; tiny searches stay narrow
    assert _tile_sizes(32, 16, 224, 224) == (64, 32, 4)
    assert _tile_sizes(30, 15, 224, 224) == (64, 32, 4)
    assert _tile_sizes(5, 4, 32, 32) == (128, 8, 2)
    assert _tile_sizes(4, 0, 8, 8) == (16, 4, 1)
    assert _tile_sizes(64, 16, 64, 64) == (16, 32, 1)  # one candidate: B == H == W


# ----------------------------------------------------------------------------- against the reference
SHAPES = [  # N, C, H, W, B, r
    (2, 3, 13, 17, 4, 2),  # odd H/W, block does not divide the image
    (1, 1, 12, 12, 3, 1),  # C=1, N=1
    (2, 3, 10, 9, 3, 0),  # radius 0
    (1, 2, 12, 12, 6, 3),  # EVEN_K off: B=6 in a tile of 8
    (1, 1, 40, 40, 36, 2),  # B > 32: two kx chunks, the second masked
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_matches_reference(dtype, shape):
    N, C, H, W, B, r = shape
    a, b = torch.rand(N, C, H, W).to(dtype), torch.rand(N, C, H, W).to(dtype)
    psnr, off = _bm(a, b, B, r)
    assert_block_match(psnr, off, a, b, B, r, exact_offsets=True)


@pytest.mark.parametrize("layout_a,layout_b", [("channels_last", "sliced"), ("sliced", "channels_last")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts(layout_a, layout_b, dtype):
    a = make_layout(torch.rand(2, 3, 11, 13).to(dtype), layout_a)
    b = make_layout(torch.rand(2, 3, 11, 13).to(dtype), layout_b)
    centers = torch.randint(-2, 10, (2, 3, 4, 2), dtype=torch.int32)
    flip = torch.tensor([True, False])
    psnr, off = _bm(a, b, 3, 2, centers=centers, flip=flip)
    assert_block_match(psnr, off, a, b, 3, 2, centers=centers, flip=flip, exact_offsets=True)
    # the strides are read in place: same answer as from contiguous copies
    psnr_c, off_c = _bm(a.contiguous(), b.contiguous(), 3, 2, centers=centers, flip=flip)
    assert torch.equal(off, off_c) and torch.equal(psnr, psnr_c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_planted_shift_recovered_exactly(dtype):
    shifts = [(2, -1), (-3, 3)]
    a, b = _shifted_pair(2, 3, 16, 16, shifts, dtype=dtype)
    psnr, off = _bm(a, b, 4, 3)
    for n, (dy, dx) in enumerate(shifts):
        # blocks whose shifted copy lies inside b are found exactly, with mse 0
        inside = [(i, j) for i in range(4) for j in range(4) if 0 <= 4 * i + dy <= 12 and 0 <= 4 * j + dx <= 12]
        assert len(inside) >= 8
        for i, j in inside:
            assert off[n, i, j].tolist() == [dy, dx]
            assert psnr[n, i, j] == float("inf")
    assert_block_match(psnr, off, a, b, 4, 3, exact_offsets=True)


@pytest.mark.parametrize("tiles", ["default", "narrow"])
def test_binary_images_exact_ties(tiles, monkeypatch):
    # 0/1 pixels make many candidates tie exactly (integer sums are exact in any order), so the
    # winners are decided by the tie rule alone: smallest |dy|+|dx|, then dy, then dx. "narrow"
    # forces tiles of 16 candidates, so ties also meet across tiles (49 candidates per block).
    if tiles == "narrow":
        import effssl_kernels.triton.block_match as tbm

        monkeypatch.setattr(tbm, "_tile_sizes", lambda *args: (16, 4, 1))
    a = torch.randint(0, 2, (3, 1, 12, 12)).float()
    b = torch.randint(0, 2, (3, 1, 12, 12)).float()
    psnr, off = _bm(a, b, 3, 3)
    ref_psnr, ref_off = block_match_reference(a, b, 3, 3)
    assert torch.equal(off, ref_off)
    torch.testing.assert_close(psnr, ref_psnr, atol=1e-4, rtol=0)


def test_identical_and_constant_views():
    a = torch.rand(2, 3, 12, 10)
    psnr, off = _bm(a, a.clone(), 4, 2)
    assert torch.isposinf(psnr).all() and (off == 0).all()
    # constant images: every candidate ties at mse 0; centres pushed off the top-left corner make
    # (0, 0) invalid, so the order among the remaining ones decides
    c = torch.full((1, 1, 12, 12), 0.5)
    centers = torch.tensor([[[[-1, 3], [4, -2], [-2, -2]]]], dtype=torch.int32).expand(1, 3, 3, 2).contiguous()
    psnr, off = _bm(c, c.clone(), 4, 3, centers=centers)
    assert torch.isposinf(psnr).all()
    assert off[0, 0].tolist() == [[1, 0], [0, 2], [2, 2]]
    assert_block_match(psnr, off, c, c, 4, 3, centers=centers, exact_offsets=True)


def test_border_and_far_centres():
    N, C, H, W, B, r = 2, 3, 12, 12, 4, 2
    a, b = torch.rand(N, C, H, W), torch.rand(N, C, H, W)
    centers = torch.randint(-1, 10, (N, 3, 3, 2), dtype=torch.int32)
    centers[0, 0, 0] = torch.tensor([H - B + r + 1, 0])  # just past the bottom: no candidate
    centers[0, 0, 1] = torch.tensor([0, -r - 1])  # just past the left: no candidate
    centers[0, 0, 2] = torch.tensor([H - B + r, -r])  # corner: exactly one candidate (-r, r)
    centers[1, 1] = torch.tensor([[I32_MIN, I32_MIN], [I32_MAX, I32_MAX], [I32_MIN, 0]], dtype=torch.int32)
    centers[1, 2] = torch.tensor([[0, I32_MAX], [I32_MAX, I32_MIN], [5, 5]], dtype=torch.int32)
    psnr, off = _bm(a, b, B, r, centers=centers)
    none = torch.zeros(N, 3, 3, dtype=torch.bool)
    none[0, 0, :2] = True
    none[1, 1] = True
    none[1, 2, :2] = True
    assert torch.equal(torch.isneginf(psnr), none)
    assert (off[none] == 0).all()
    assert off[0, 0, 2].tolist() == [-r, r]
    assert_block_match(psnr, off, a, b, B, r, centers=centers, exact_offsets=True)
    # int64 centres beyond int32 are clamped by the op and still find nothing
    far = centers.long()
    far[1, 2, 2] = torch.tensor([2**40, -(2**40)])
    psnr64, off64 = _bm(a, b, B, r, centers=far)
    assert torch.isneginf(psnr64[1, 2, 2]) and (off64[1, 2, 2] == 0).all()
    assert_block_match(psnr64, off64, a, b, B, r, centers=far, exact_offsets=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flip(dtype):
    a = torch.rand(3, 2, 9, 11).to(dtype)
    flip = torch.tensor([True, False, True])
    # b mirrored: an exact match at offset 0 for the flipped samples
    psnr, off = _bm(a, a.flip(-1), 3, 2, flip=flip)
    assert torch.isposinf(psnr[flip]).all() and (off[flip] == 0).all()
    assert_block_match(psnr, off, a, a.flip(-1), 3, 2, flip=flip, exact_offsets=True)
    # planted shift seen through the mirror: a[y, x] == b_mirrored_back[y + dy, x + dx]
    a2, b2 = _shifted_pair(3, 2, 9, 11, [(1, 2), (-2, 1), (0, -2)], dtype=dtype)
    b2 = torch.where(flip.view(3, 1, 1, 1), b2.flip(-1), b2)
    centers = torch.randint(-1, 9, (3, 3, 3, 2), dtype=torch.int32)
    psnr, off = _bm(a2, b2, 3, 2, flip=flip)
    assert off[0, 1, 1].tolist() == [1, 2] and off[2, 1, 1].tolist() == [0, -2]
    assert_block_match(psnr, off, a2, b2, 3, 2, flip=flip, exact_offsets=True)
    psnr, off = _bm(a2, b2, 3, 2, flip=flip, centers=centers)
    assert_block_match(psnr, off, a2, b2, 3, 2, flip=flip, centers=centers, exact_offsets=True)


def test_direct_op_reads_views_by_value():
    # ek.block_match densifies flip and centers, but the Triton op can be called directly: it
    # must not index views (stride 2, stride 0) as dense arrays either. test_block_match.py's
    # test_flip_and_centres_as_views covers the public function on this backend.
    N, C, H, W, B, r = 4, 2, 12, 12, 4, 1
    a = torch.rand(N, C, H, W, device=DEVICE)
    f = torch.tensor([True, True, False, True], device=DEVICE)
    flip = torch.stack([f, ~f], 1)[:, 0]  # dense read: [T, F, T, F]
    b = torch.where(flip.view(N, 1, 1, 1), a.flip(-1), a)
    ys, xs = torch.meshgrid(torch.arange(3) * B, torch.arange(3) * B, indexing="ij")
    big = torch.full((1, 3, 3, 4), 100, dtype=torch.int32, device=DEVICE)  # (y, 100, x, 100)
    big[..., 0], big[..., 2] = ys.to(DEVICE), xs.to(DEVICE)
    centers = big[..., ::2].expand(N, 3, 3, 2)  # each block's own place; strides (0, 12, 4, 2)
    psnr, off = torch.ops.effssl_kernels._block_match_triton(a, b, B, r, 1.0, centers, flip)
    assert torch.isposinf(psnr).all() and (off == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_input(dtype):
    a, b = torch.rand(2, 3, 12, 12).to(dtype), torch.rand(2, 3, 12, 12).to(dtype)
    a[0, 1, 5, 6] = float("nan")  # one block of a: every candidate NaN
    b[1, 0, 9, 2] = float("nan")  # some candidates of several blocks of sample 1
    psnr, off = _bm(a, b, 4, 2)
    assert torch.isnan(psnr[0, 1, 1])
    assert torch.isnan(psnr[1]).sum() >= 2 and not torch.isnan(psnr[1, 0, 2])
    assert not ek.similar_blocks(psnr)[torch.isnan(psnr)].any()
    assert_block_match(psnr, off, a, b, 4, 2, exact_offsets=True)


def test_data_range():
    a, b = torch.rand(1, 3, 8, 8) * 255, torch.rand(1, 3, 8, 8) * 255
    psnr, off = _bm(a, b, 4, 1, data_range=255.0)
    assert_block_match(psnr, off, a, b, 4, 1, data_range=255.0, exact_offsets=True)
    psnr1, off1 = _bm(a / 255, b / 255, 4, 1)
    assert torch.equal(off, off1)
    torch.testing.assert_close(psnr, psnr1, atol=1e-3, rtol=0)


def test_deterministic_and_empty():
    a, b = torch.rand(2, 3, 9, 9), torch.rand(2, 3, 9, 9)
    p1, o1 = _bm(a, b, 3, 2)
    p2, o2 = _bm(a, b, 3, 2)
    assert torch.equal(p1, p2) and torch.equal(o1, o2)
    psnr, off = _bm(torch.rand(0, 3, 8, 8), torch.rand(0, 3, 8, 8), 4, 1)
    assert psnr.shape == (0, 2, 2) and psnr.dtype == torch.float32
    assert off.shape == (0, 2, 2, 2) and off.dtype == torch.int32


# ----------------------------------------------------------------------------- torch.library
@pytest.mark.parametrize("with_extras", [False, True])
def test_opcheck(with_extras):
    a = torch.rand(2, 3, 8, 8, device=DEVICE)
    b = torch.rand(2, 3, 8, 8, device=DEVICE)
    centers = torch.randint(-1, 6, (2, 2, 2, 2), dtype=torch.int32, device=DEVICE) if with_extras else None
    flip = torch.tensor([True, False], device=DEVICE) if with_extras else None
    torch.library.opcheck(torch.ops.effssl_kernels._block_match_triton.default, (a, b, 4, 1, 1.0, centers, flip))


def test_compile_fullgraph():
    torch._dynamo.reset()
    a = torch.rand(2, 3, 12, 12, device=DEVICE)
    b = torch.rand(2, 3, 12, 12, device=DEVICE)
    flip = torch.tensor([False, True], device=DEVICE)

    def f(a, b, flip):
        psnr, off = ek.block_match(a, b, 4, 2, flip=flip)
        return ek.similar_blocks(psnr, 5.0), psnr, off

    backend = "aot_eager" if INTERPRET else "inductor"
    sim, psnr, off = torch.compile(f, fullgraph=True, backend=backend)(a, b, flip)
    assert_block_match(psnr, off, a, b, 4, 2, flip=flip, exact_offsets=True)
    assert torch.equal(sim, psnr > 5.0)


def test_overflowing_mse_is_no_match():
    # every candidate's sum overflows to +inf: no match (-inf dB, offset (0, 0)) as the
    # reference, not the first-ranked candidate of the first tile (audit 99)
    a = torch.full((1, 1, 8, 8), 3e38)
    b = torch.full((1, 1, 8, 8), -3e38)
    centers = torch.tensor([0, 5], dtype=torch.int32).expand(1, 2, 2, 2)
    psnr, off = _bm(a, b, 4, 2, centers=centers)
    assert torch.isneginf(psnr).all()
    assert (off == 0).all()
    psnr, off = _bm(a, b, 4, 2)  # grid centres: (0, 0) is a candidate too
    assert torch.isneginf(psnr).all() and (off == 0).all()
