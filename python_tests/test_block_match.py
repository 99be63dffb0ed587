"""block_match / similar_blocks: C++ CPU kernel and CUDA kernel against the reference (flip and
centers given as views: every backend)."""
import importlib.util
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import effssl_kernels as ek
from effssl_kernels.ops.block_match import MAX_RADIUS
from effssl_kernels.reference import block_match_reference, candidate_order
from utils import DTYPES, HAS_GPU, INTERPRET, assert_block_match, make_layout, requires_gpu

DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def _shifted_pair(N, C, H, W, dy, dx, *, pad=8, dtype=torch.float32, device="cpu"):
    """a and b cut from one random image so that a[y, x] == b[y + dy, x + dx]."""
    img = torch.rand(N, C, H + 2 * pad, W + 2 * pad)
    a = img[:, :, pad : pad + H, pad : pad + W]
    b = img[:, :, pad - dy : pad - dy + H, pad - dx : pad - dx + W]
    return a.to(device, dtype), b.to(device, dtype)


def _photo(size=64):
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(np.ascontiguousarray(skimage_data.astronaut())).permute(2, 0, 1).float() / 255
    return torch.nn.functional.interpolate(img[None], size=(4 * size, 4 * size), mode="area")[0]


# ----------------------------------------------------------------------------- the oracle itself
def test_reference_matches_brute_force_loop():
    # An independent scalar loop over blocks and candidates checks the vectorised reference.
    a, b = torch.rand(1, 2, 9, 11), torch.rand(1, 2, 9, 11)
    B, r = 3, 2
    psnr, off = block_match_reference(a, b, B, r)
    for i, j in itertools.product(range(3), range(3)):
        best = None
        for dy, dx in candidate_order(r):
            y, x = i * B + dy, j * B + dx
            if 0 <= y <= 9 - B and 0 <= x <= 11 - B:
                mse = ((a[0, :, i * B : i * B + B, j * B : j * B + B] - b[0, :, y : y + B, x : x + B]) ** 2).mean()
                if best is None or mse < best[0]:
                    best = (mse, dy, dx)
        assert off[0, i, j].tolist() == [best[1], best[2]]
        torch.testing.assert_close(psnr[0, i, j], 10 * torch.log10(1 / best[0]))


def test_candidate_order():
    order = candidate_order(1)
    assert order[0] == (0, 0)
    assert order[1:5] == [(-1, 0), (0, -1), (0, 1), (1, 0)]
    assert len(set(order)) == 9
    # a box keeps the same relative order
    assert candidate_order(3, (-1, 5), (0, 1)) == [d for d in candidate_order(3) if -1 <= d[0] and 0 <= d[1] <= 1]


@pytest.mark.parametrize("with_centers", [False, True])
def test_reference_radius_far_beyond_the_image(with_centers):
    # the accepted maximum radius: the reference lists only candidates that can land inside b
    # (the full (2r+1)^2 list would take tens of GB), and agrees with the C++ kernel
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    centers = torch.randint(-3, 7, (2, 2, 2, 2), generator=g) if with_centers else None
    psnr, off = block_match_reference(a, b, 4, MAX_RADIUS, centers=centers)
    small = block_match_reference(a, b, 4, 7, centers=centers)  # 7 already reaches every candidate
    assert torch.equal(psnr, small[0]) and torch.equal(off, small[1])
    assert_block_match(*ek.block_match(a, b, 4, MAX_RADIUS, centers=centers), a, b, 4, MAX_RADIUS, centers=centers)


def test_reference_far_apart_centres_and_radius():
    # crop_centers' far value (-2^30, a degenerate box) next to normal centres at a radius beyond
    # the image: the displacements between them are ~2^60 candidates (the reference once listed
    # them and died for memory); its loop over the positions of b gives the C++ kernel's answer
    a = torch.rand(2, 1, 8, 8)
    centers = torch.zeros(2, 2, 2, 2, dtype=torch.int64)
    centers[0] = torch.tensor([[[0, 0], [0, 4]], [[4, 0], [4, 4]]])
    centers[1] = -(2**30)
    psnr, off = block_match_reference(a, a.clone(), 4, 65536, centers=centers)
    assert torch.isposinf(psnr[0]).all() and torch.isneginf(psnr[1]).all() and (off == 0).all()
    assert_block_match(*ek.block_match(a, a.clone(), 4, 65536, centers=centers), a, a.clone(), 4, 65536,
                       centers=centers)


@pytest.mark.parametrize("seed", range(4))
def test_reference_position_loop_breaks_ties_like_candidate_order(seed):
    # 0/1 pixels make exact mse ties everywhere, NaN pixels NaN ties: the loop over positions
    # (radius beyond the image) must pick candidate_order's first, as the displacement loop does
    from effssl_kernels.reference.block_match import _by_position

    g = torch.Generator().manual_seed(seed)
    N, C, H, W, B, r = 2, 2, 11, 9, 3, 6
    a = torch.randint(0, 2, (N, C, H, W), generator=g).float()
    b = torch.randint(0, 2, (N, C, H, W), generator=g).float()
    a[0, 0, 1, 1] = b[1, 1, 5, 5] = float("nan")
    centers = torch.randint(-6, 14, (N, H // B, W // B, 2), generator=g)
    psnr, off = block_match_reference(a, b, B, r, centers=centers)  # r < max(H, W): displacements
    a_blk = a[:, :, :9, :9].reshape(N, C, 3, B, 3, B).permute(0, 1, 2, 4, 3, 5)
    best, off2 = _by_position(a_blk, b, centers[..., 0], centers[..., 1], B, r)
    assert torch.equal(off2, off)
    torch.testing.assert_close(10 * torch.log10(1 / best), psnr, equal_nan=True)


# ----------------------------------------------------------------------------- against the reference
SHAPES = [  # N, C, H, W, B, r
    (2, 3, 32, 32, 4, 4),
    (3, 3, 32, 32, 5, 5),
    (1, 1, 13, 17, 3, 2),
    (2, 3, 37, 41, 8, 6),
    (1, 3, 24, 24, 24, 3),  # one block as large as the image
    (2, 2, 9, 30, 1, 1),
    (1, 4, 20, 20, 6, 0),  # radius 0: the block's own position only
    # r >= 8: the CPU kernel's full 16-candidate tiles (tile_ssd16) plus a tail
    (2, 3, 40, 44, 4, 9),  # 19 candidates per row: one tile and a tail of 3
    (1, 1, 20, 40, 2, 16),  # 33 per row: two tiles and a tail of 1
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_random_matches_reference(device, dtype, shape):
    N, C, H, W, B, r = shape
    a = torch.rand(N, C, H, W).to(device, dtype)
    b = torch.rand(N, C, H, W).to(device, dtype)
    psnr, off = ek.block_match(a, b, B, r)
    assert psnr.device.type == device
    assert_block_match(psnr, off, a, b, B, r, exact_offsets=(device == "cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts(device, layout, dtype):
    a = torch.rand(2, 3, 21, 26).to(device, dtype)
    b = (a + 0.05 * torch.randn_like(a.float()).to(dtype)).clamp(0, 1)
    expect = ek.block_match(a.contiguous(), b.contiguous(), 5, 3)
    got = ek.block_match(make_layout(a, layout), make_layout(b, "sliced"), 5, 3)
    torch.testing.assert_close(got[0], expect[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1], expect[1], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", [(0, 0), (2, -3), (-4, 4), (1, 0)])
def test_planted_shift_recovered_exactly(device, dtype, shift):
    dy, dx = shift
    B, r = 5, 4
    a, b = _shifted_pair(2, 3, 30, 35, dy, dx, dtype=dtype, device=device)
    psnr, off = ek.block_match(a, b, B, r)
    for i, j in itertools.product(range(30 // B), range(35 // B)):
        if 0 <= i * B + dy <= 30 - B and 0 <= j * B + dx <= 35 - B:
            assert off[:, i, j].tolist() == [[dy, dx]] * 2
            assert torch.isposinf(psnr[:, i, j]).all()
    assert_block_match(psnr, off, a, b, B, r)


@pytest.mark.parametrize("r", [1, 2, 4, 5, 6, 9, 16])
def test_cpu_candidate_tiles(r):
    # The CPU kernel scores a row of candidates in tiles of 16, 8 and 4 (tile_ssd_vec), a tail of
    # 1-3 with a 4-wide tile backed up over scored candidates, and rows of fewer than 4 one at a
    # time (tile_ssd): 2r + 1 = 3 (scalar), 5 (4 + a tail of 1), 9 (8 + 1), 11 (8 + 3), 13
    # (8 + 4 + 1), 19 (16 + 3), 33 (16 + 16 + 1), and clipped rows near the border other splits.
    # Offsets must equal the reference's, planted shifts must be found in every tile.
    N, C, B = 3, 2, 4
    H, W = 2 * r + 8, 2 * r + 20
    # dx in the first tile, a later one, the tail
    for dy, dx in [(min(1, r), -r), (-min(2, r), max(-r, r - 4)), (0, r)]:
        a, b = _shifted_pair(N, C, H, W, dy, dx, pad=r)
        psnr, off = ek.block_match(a, b, B, r)
        ys, xs = torch.arange(H // B) * B + dy, torch.arange(W // B) * B + dx
        inside = ((ys >= 0) & (ys <= H - B))[:, None] & ((xs >= 0) & (xs <= W - B))[None, :]
        assert inside.sum() >= 4
        assert torch.isposinf(psnr[:, inside]).all()
        assert (off[:, inside] == torch.tensor([dy, dx], dtype=torch.int32)).all()
        assert_block_match(psnr, off, a, b, B, r, exact_offsets=True)
    a, b = torch.rand(N, C, H, W), torch.rand(N, C, H, W)
    centers = torch.randint(-r, max(H, W) + r, (N, H // B, W // B, 2))
    flip = torch.tensor([True, False, True])
    psnr, off = ek.block_match(a, b, B, r, centers=centers, flip=flip)
    assert_block_match(psnr, off, a, b, B, r, centers=centers, flip=flip, exact_offsets=True)


@pytest.mark.parametrize("device", DEVICES)
def test_real_photo(device):
    img = _photo(64)  # 3 x 256 x 256 real photograph
    a = img[:, 20:84, 30:94][None]
    b = (img[:, 23:87, 28:92][None] + 0.01 * torch.randn(1, 3, 64, 64)).clamp(0, 1)
    a, b = a.to(device), b.to(device)
    psnr, off = ek.block_match(a, b, 8, 4)
    assert_block_match(psnr, off, a, b, 8, 4)
    interior = off[0, 1:-1, 1:-1].reshape(-1, 2)
    # b is a shifted by (-3, +2) plus a little noise: interior blocks find the shift.
    assert (interior == torch.tensor([-3, 2], dtype=torch.int32, device=device)).all(dim=1).float().mean() > 0.9
    assert ek.similar_blocks(psnr).float().mean() > 0.9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_views_are_inf(device, dtype):
    a = torch.rand(2, 3, 16, 16).to(device, dtype)
    psnr, off = ek.block_match(a, a.clone(), 4, 3)
    assert torch.isposinf(psnr).all()
    assert (off == 0).all()  # (0, 0) wins every exact tie


@pytest.mark.parametrize("device", DEVICES)
def test_constant_images_tie_break(device):
    # Every candidate ties: the smallest |dy|+|dx| (then dy, dx) must win, on every backend.
    a = torch.full((1, 1, 12, 12), 0.5, device=device)
    b = torch.full((1, 1, 12, 12), 0.25, device=device)
    centers = torch.tensor([[[[-2, 5]]]], device=device).expand(1, 3, 3, 2).contiguous()
    psnr, off = ek.block_match(a, b, 4, 3, centers=centers)
    # centre y = -2: the nearest inside candidate is dy = 2; x = 5 is inside, so dx = 0.
    assert (off[..., 0] == 2).all() and (off[..., 1] == 0).all()
    torch.testing.assert_close(psnr, torch.full_like(psnr, 10 * np.log10(1 / 0.0625)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flip", [False, True])
def test_binary_images_exact_ties(device, flip):
    # 0/1 pixels make many candidates tie exactly (integer sums are exact in any order), so the
    # winners are decided by the tie rule alone: smallest |dy|+|dx|, then dy, then dx; a kernel
    # that ranked dx before dy passed every test on random floats (audit 78)
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 2, (3, 1, 12, 12), generator=g).float()
    b = torch.randint(0, 2, (3, 1, 12, 12), generator=g).float()
    fl = torch.tensor([flip, False, flip])
    psnr, off = ek.block_match(a.to(device), b.to(device), 3, 3, flip=fl.to(device))
    ref_psnr, ref_off = block_match_reference(a, b, 3, 3, flip=fl)
    assert torch.equal(off.cpu(), ref_off)
    torch.testing.assert_close(psnr.cpu(), ref_psnr, atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_border_and_far_centres(device):
    a, b = torch.rand(2, 3, 16, 20, device=device), torch.rand(2, 3, 16, 20, device=device)
    centers = torch.zeros(2, 4, 5, 2, dtype=torch.int64, device=device)
    centers[0, :, :, 0] = -10  # 10 rows above the image, radius 3: no candidate
    centers[1, :, :, 1] = 17  # x = 17: only dx in [-3, -1] keeps a 4-wide block inside 20 columns
    centers[1, 0, 0] = torch.tensor([2**40, -(2**40)])  # int64 beyond int32: no candidate
    centers[1, 0, 1] = torch.tensor([2**31 - 1, 0])
    psnr, off = ek.block_match(a, b, 4, 3, centers=centers)
    assert torch.isneginf(psnr[0]).all() and (off[0] == 0).all()
    assert torch.isneginf(psnr[1, 0, :2]).all() and (off[1, 0, :2] == 0).all()
    assert torch.isfinite(psnr[1, 1:]).all()
    assert_block_match(psnr, off, a, b, 4, 3, centers=centers.clamp(-(2**31), 2**31 - 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flip_and_centres(device, dtype):
    N, C, H, W, B, r = 3, 3, 20, 24, 4, 3
    a, b = torch.rand(N, C, H, W).to(device, dtype), torch.rand(N, C, H, W).to(device, dtype)
    flip = torch.tensor([True, False, True], device=device)
    centers = torch.randint(-6, 26, (N, H // B, W // B, 2), device=device, dtype=torch.int32)
    psnr, off = ek.block_match(a, b, B, r, centers=centers, flip=flip)
    assert_block_match(psnr, off, a, b, B, r, centers=centers, flip=flip)
    # A view and its mirror image, searched with flip, match perfectly at offset 0.
    psnr, off = ek.block_match(a, a.flip(-1), B, r, flip=torch.ones(N, dtype=torch.bool, device=device))
    assert torch.isposinf(psnr).all() and (off == 0).all()
    # The kernels mirror a copy, never the caller's b (the CPU one mirrors flipped samples of its
    # float32 copy in place, and a float32 contiguous b is that copy unless cloned); no flips is
    # the search without flip.
    before = b.clone()
    ek.block_match(a, b, B, r, flip=flip)
    assert torch.equal(b, before)
    none = torch.zeros(N, dtype=torch.bool, device=device)
    for got, want in zip(ek.block_match(a, b, B, r, flip=none), ek.block_match(a, b, B, r)):
        assert torch.equal(got, want)


# Every backend on every device this machine has: (device, EFFSSL_BACKEND). Triton runs CPU
# tensors only under its interpreter (conftest.py sets it where there is no GPU).
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRITON_CPU = [pytest.mark.triton, pytest.mark.skipif(not (_HAS_TRITON and INTERPRET), reason="TRITON_INTERPRET=1")]
_TRITON_GPU = [pytest.mark.triton, pytest.mark.skipif(not _HAS_TRITON, reason="needs triton")]
BACKENDS = [("cpu", "reference"), ("cpu", "cpp"), pytest.param("cpu", "triton", marks=_TRITON_CPU)]
if HAS_GPU:
    BACKENDS += [("cuda", "reference"), ("cuda", "cuda"), pytest.param("cuda", "triton", marks=_TRITON_GPU)]


def _flip_view(kind, device):
    """bool [4] flip that is a view, not a dense array: a column of an [N, 2] tensor (as
    ``flips[:, 0]`` of random_resized_boxes) or a stride-0 expand of one flag."""
    if kind == "column":
        f = torch.tensor([True, True, False, True], device=device)
        # read as a dense array the column gives [T, F, T, F]: wrong for samples 1, 2, 3
        flip = torch.stack([f, ~f], 1)[:, 0]
    else:
        # one True flag of a longer storage, expanded: a dense read gives [T, F, F, F]
        flip = torch.tensor([True, False, False, False], device=device)[:1].expand(4)
    assert not flip.is_contiguous()
    return flip


def _centers_view(kind, values):
    """``values`` [N, Hb, Wb, 2] as a strided int64 slice or (all samples equal) an int32 expand."""
    N, Hb, Wb, _ = values.shape
    if kind == "expand":
        return values[:1].int().expand(N, Hb, Wb, 2)
    big = torch.zeros(N, Hb, 2 * Wb, 2, dtype=torch.int64, device=values.device)
    big[:, :, ::2] = values
    return big[:, :, ::2]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("flip_kind", ["column", "expand"])
@pytest.mark.parametrize("centers_kind", ["strided", "expand"])
def test_flip_and_centres_as_views(device, backend, flip_kind, centers_kind, monkeypatch):
    # flip and centers that are views (stride 2, stride 0) are read by value on every backend.
    monkeypatch.setenv("EFFSSL_BACKEND", backend)
    N, C, H, W, B, r = 4, 2, 12, 16, 4, 2
    flip = _flip_view(flip_kind, device)
    a = torch.rand(N, C, H, W, device=device)
    # b is a, mirrored where flip is set: searched at each block's own place every block is an
    # exact match at (0, 0); a flag read from the wrong sample makes it finite
    b = torch.where(flip.view(N, 1, 1, 1), a.flip(-1), a)
    ys, xs = torch.meshgrid(torch.arange(H // B) * B, torch.arange(W // B) * B, indexing="ij")
    own = torch.stack([ys, xs], -1).to(device).expand(N, H // B, W // B, 2)
    psnr, off = ek.block_match(a, b, B, r, centers=_centers_view(centers_kind, own), flip=flip)
    assert torch.isposinf(psnr).all() and (off == 0).all()
    # random b and centres: the same answer as from dense copies, and the reference's
    b = torch.rand(N, C, H, W, device=device)
    centers = _centers_view(centers_kind, torch.randint(-3, 14, (N, H // B, W // B, 2), device=device))
    psnr, off = ek.block_match(a, b, B, r, centers=centers, flip=flip)
    dense = ek.block_match(a, b, B, r, centers=centers.contiguous(), flip=flip.contiguous())
    assert torch.equal(psnr, dense[0]) and torch.equal(off, dense[1])
    assert_block_match(psnr, off, a, b, B, r, centers=centers, flip=flip, exact_offsets=backend != "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_overflowing_mse_is_no_match(device):
    # Values far outside data_range: every candidate's sum overflows to +inf. That is no match
    # (-inf dB, offset (0, 0)) as in the reference, not the first-ranked candidate.
    a = torch.full((1, 1, 8, 8), 3e38, device=device)
    b = torch.full((1, 1, 8, 8), -3e38, device=device)
    # centres one column past the last valid x: displacement (0, 0) is not a candidate
    centers = torch.tensor([0, 5], dtype=torch.int32, device=device).expand(1, 2, 2, 2)
    psnr, off = ek.block_match(a, b, 4, 2, centers=centers)
    ref_psnr, ref_off = block_match_reference(a.cpu(), b.cpu(), 4, 2, centers=centers.cpu())
    assert torch.isneginf(psnr).all() and torch.isneginf(ref_psnr).all()
    assert (off == 0).all() and (ref_off == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_never_similar(device):
    a, b = torch.rand(1, 3, 16, 16, device=device), torch.rand(1, 3, 16, 16, device=device)
    a[0, 1, 5, 5] = float("nan")  # inside block (1, 1) of a
    b[0, 0, 15, 15] = float("nan")  # reachable only from blocks near the bottom-right corner
    psnr, off = ek.block_match(a, b, 4, 1)
    assert torch.isnan(psnr[0, 1, 1])
    assert torch.isnan(psnr[0, 3, 3])
    assert torch.isfinite(psnr[0, 0, 0])
    assert not ek.similar_blocks(psnr)[0, 1, 1]
    assert_block_match(psnr, off, a, b, 4, 1)


def test_data_range_scales():
    a, b = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    p1, o1 = ek.block_match(a, b, 4, 2)
    p255, o255 = ek.block_match(a * 255, b * 255, 4, 2, data_range=255.0)
    torch.testing.assert_close(p255, p1, atol=1e-3, rtol=0)
    assert torch.equal(o1, o255)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("data_range", [1e-18, 1e18])
def test_data_range_at_its_bounds(device, backend, data_range, monkeypatch):
    # mse ~2.5e-39 at data_range 1e-18: the reference's scalar / mse overflowed (scalar *
    # reciprocal) and called distinct blocks identical (+inf dB, similar at any threshold)
    monkeypatch.setenv("EFFSSL_BACKEND", backend)
    a = torch.full((1, 1, 2, 2), 0.50 * data_range, device=device)
    b = torch.full((1, 1, 2, 2), 0.55 * data_range, device=device)
    psnr, off = ek.block_match(a, b, 2, 0, data_range=data_range)
    want = 10 * math.log10(1 / 0.05**2)  # 26.02 dB, whatever the scale
    assert abs(psnr.item() - want) < 1e-3, psnr
    assert not ek.similar_blocks(psnr, 30.0).item()
    assert_block_match(psnr, off, a, b, 2, 0, data_range=data_range)


def test_data_range_whose_block_sum_overflows_is_refused():
    # the kernels sum C * B^2 squared differences of up to data_range in float32: at 4e17 with
    # C = 3, B = 32 that overflows, and a block 0 dB away came out -inf ("no candidate")
    a, b = torch.zeros(1, 3, 32, 32), torch.full((1, 3, 32, 32), 3e17)
    psnr, _ = ek.block_match(a, b, 32, 0, data_range=3e17)  # 2.8e38: still fits
    assert abs(psnr.item()) < 1e-3
    with pytest.raises(ValueError, match=r"data_range\^2 \* C \* block_size\^2 .* overflows float32"):
        ek.block_match(a, b, 32, 0, data_range=4e17)
    with pytest.raises(RuntimeError, match=r"data_range\^2 \* C \* block_size\^2 .* overflows float32"):
        torch.ops.effssl_kernels.block_match(a, b, 32, 0, 4e17, None, None)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_and_no_grad(device):
    a = torch.rand(2, 3, 32, 32, device=device, requires_grad=True)
    b = torch.rand(2, 3, 32, 32, device=device)
    p1, o1 = ek.block_match(a, b, 4, 4)
    p2, o2 = ek.block_match(a, b, 4, 4)
    assert torch.equal(p1, p2) and torch.equal(o1, o2)
    assert not p1.requires_grad and not o1.requires_grad


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_batch(backend, monkeypatch):
    monkeypatch.setenv("EFFSSL_BACKEND", backend)
    psnr, off = ek.block_match(torch.rand(0, 3, 20, 23), torch.rand(0, 3, 20, 23), 4, 2)
    assert psnr.shape == (0, 5, 5) and off.shape == (0, 5, 5, 2)
    assert psnr.dtype == torch.float32 and off.dtype == torch.int32


# ----------------------------------------------------------------------------- similar_blocks
def test_similar_blocks():
    psnr = torch.tensor([float("nan"), float("-inf"), float("inf"), 20.0, 20.001, 19.0])
    assert ek.similar_blocks(psnr).tolist() == [False, False, True, False, True, False]
    assert ek.similar_blocks(psnr, threshold_db=18.5).tolist() == [False, False, True, True, True, True]
    with pytest.raises(TypeError):
        ek.similar_blocks(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="NaN"):  # would mark nothing similar, silently
        ek.similar_blocks(psnr, float("nan"))
    with pytest.raises(TypeError, match="threshold_db must be a number"):
        ek.similar_blocks(psnr, None)


def test_integer_like_arguments():
    # NumPy integers and 0-d integer tensors are ints (operator.index), as in torch's own APIs
    a, b = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    want = ek.block_match(a, b, 4, 2)
    for got in (ek.block_match(a, b, np.int64(4), np.int32(2)), ek.block_match(a, b, torch.tensor(4), 2)):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


# ----------------------------------------------------------------------------- bad input
BAD = [
    (lambda a, b: ek.block_match(a[0], b[0], 4, 2), ValueError, "4-D"),
    (lambda a, b: ek.block_match(a, b[:, :2], 4, 2), ValueError, "same shape"),
    (lambda a, b: ek.block_match(a, b.double(), 4, 2), TypeError, "same dtype"),
    (lambda a, b: ek.block_match(a.double(), b.double(), 4, 2), TypeError, "float32, float16 or bfloat16"),
    (lambda a, b: ek.block_match(a, b, 0, 2), ValueError, "positive"),
    (lambda a, b: ek.block_match(a, b, 17, 2), ValueError, "larger than the image"),
    (lambda a, b: ek.block_match(a, b, 4, -1), ValueError, "search_radius"),
    (lambda a, b: ek.block_match(a, b, 4.0, 2), TypeError, "block_size must be an int"),
    (lambda a, b: ek.block_match(a, b, True, 2), TypeError, "block_size must be an int"),
    (lambda a, b: ek.block_match(a, b, 4, 2.5), TypeError, "search_radius must be an int"),
    (lambda a, b: ek.block_match(a.byte(), b.byte(), 4, 2), TypeError, "uint8 views"),
    (lambda a, b: ek.block_match(a, b, 4, 2, data_range="2"), TypeError, "data_range must be a number"),
    (lambda a, b: ek.block_match(a, b, 4, 2, data_range=1e40), ValueError, "data_range must be in"),
    (lambda a, b: ek.block_match(a, b, 4, 2, data_range=1e-30), ValueError, "data_range must be in"),
    # device checks without a GPU: the meta device
    (lambda a, b: ek.block_match(a, b.to("meta"), 4, 2), ValueError, "same device"),
    (lambda a, b: ek.block_match(a, b, 4, 2, centers=torch.zeros(2, 4, 4, 2, dtype=torch.int32, device="meta")),
     ValueError, "centers must be on cpu"),
    (lambda a, b: ek.block_match(a, b, 4, 2, flip=torch.zeros(2, dtype=torch.bool, device="meta")),
     ValueError, "flip must be on cpu"),
    (lambda a, b: ek.block_match(a, b, 4, 2, data_range=0), ValueError, "data_range"),
    (lambda a, b: ek.block_match(a, b, 4, 2, data_range=float("nan")), ValueError, "data_range"),
    (lambda a, b: ek.block_match(a, b, 4, 2, centers=torch.zeros(2, 4, 4, 2)), TypeError, "integer"),
    (lambda a, b: ek.block_match(a, b, 4, 2, centers=torch.zeros(2, 4, 3, 2, dtype=torch.long)), ValueError, "shape"),
    (lambda a, b: ek.block_match(a, b, 4, 2, flip=torch.zeros(2)), TypeError, "bool"),
    (lambda a, b: ek.block_match(a, b, 4, 2, flip=torch.zeros(3, dtype=torch.bool)), ValueError, "shape"),
]


def test_channel_rows_past_int32_are_refused():
    # The kernels count channel rows C * block_size in int32: C = 2^30 at block 2 wrapped (the
    # CUDA kernel's re-score loop never ran: psnr +inf, every block "similar"). Stride-0 inputs.
    a = torch.zeros(1, 1, 2, 2).expand(1, 2**30, 2, 2)
    with pytest.raises(ValueError, match=r"C \* block_size = 2147483648 must be below 2\^31"):
        ek.block_match(a, a, 2, 0)
    with pytest.raises(RuntimeError, match=r"C \* block_size = 2147483648 must be below 2\^31"):
        torch.ops.effssl_kernels.block_match(a, a, 2, 0, 1.0, None, None)


@pytest.mark.parametrize("call,exc,msg", BAD)
def test_bad_input_python(call, exc, msg):
    a, b = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    with pytest.raises(exc, match=msg):
        call(a, b)


@pytest.mark.parametrize(
    "args,msg",
    [
        ((torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 9), 4, 2, 1.0, None, None), "same shape"),
        ((torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), 9, 2, 1.0, None, None), "larger than the image"),
        ((torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), 4, -2, 1.0, None, None), "search_radius"),
        ((torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), 4, 2, -1.0, None, None), "data_range"),
        # the wrapper's bounds: data_range^2 under- or overflowed float32, every psnr -inf / +inf
        ((torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), 4, 2, 1e-30, None, None), r"data_range must be in \[1e-18"),
        ((torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), 4, 2, 1e30, None, None), r"data_range must be in \[1e-18"),
        ((torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), 4, 2, 1.0, torch.zeros(2, 2, 2, 2), None), "int32 or int64"),
        ((torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), 4, 2, 1.0, None, torch.zeros(1, dtype=torch.bool)), "flip"),
        ((torch.rand(2, 3, 8, 8).int(), torch.rand(2, 3, 8, 8).int(), 4, 2, 1.0, None, None), "dtype"),
        # audit 100: checks the wrapper makes first, so only a direct call reaches the C++ ones
        ((torch.rand(1, 1, 16, 8), torch.rand(1, 1, 16, 8), 12, 1, 1.0, None, None), "larger than the image"),
        ((torch.rand(1, 1, 8, 16), torch.rand(1, 1, 8, 16), 4, 1, 1.0, torch.zeros(1, 4, 2, 2, dtype=torch.int32), None),
         "centers must have shape"),  # [N, Wb, Hb, 2]: the grid transposed
        ((torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), 4, 2, 1.0, None, torch.zeros(3, dtype=torch.bool)),
         "flip must have shape"),  # longer than N
        ((torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8).half(), 4, 1, 1.0, None, None), "same dtype"),
        ((torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), 4, 2**32, 1.0, None, None), "search_radius"),  # not 0
    ],
)
def test_bad_input_direct_op(args, msg):
    # The C++ op checks its arguments itself: a direct torch.ops call fails clearly, never crashes.
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.effssl_kernels.block_match(*args)


def test_direct_op_noncontiguous_centers():
    # The kernel reads centres as a dense [N, Hb, Wb, 2] array: a strided int32 view is copied
    # (the wrapper always passes contiguous centres; audit 100)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 16, 20, generator=g), torch.rand(2, 3, 16, 20, generator=g)
    c = torch.randint(-2, 18, (2, 5, 4, 2), dtype=torch.int32, generator=g).transpose(1, 2)  # [2, 4, 5, 2]
    assert not c.is_contiguous()
    psnr, off = torch.ops.effssl_kernels.block_match(a, b, 4, 2, 1.0, c, None)
    ref_psnr, ref_off = block_match_reference(a, b, 4, 2, 1.0, c.contiguous(), None)
    assert torch.equal(off, ref_off)
    torch.testing.assert_close(psnr, ref_psnr, atol=1e-3, rtol=0)


def test_direct_op_int64_centers_beyond_int32_clamped():
    # int64 centres of 2^32 are far outside the image (no candidate: -inf at offset 0), not
    # wrapped to row 0 by a cast to int32 (audit 100)
    a, b = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    c = torch.zeros(1, 2, 2, 2, dtype=torch.int64)
    c[..., 0] = 2**32
    psnr, off = torch.ops.effssl_kernels.block_match(a, b, 4, 1, 1.0, c, None)
    assert torch.isneginf(psnr).all() and (off == 0).all()


@requires_gpu
def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="same device"):
        ek.block_match(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8, device="cuda"), 4, 1)
    with pytest.raises(ValueError, match="centers must be on"):
        ek.block_match(torch.rand(1, 3, 8, 8, device="cuda"), torch.rand(1, 3, 8, 8, device="cuda"), 4, 1,
                       centers=torch.zeros(1, 2, 2, 2, dtype=torch.int32))


def test_bad_backend_env(monkeypatch):
    monkeypatch.setenv("EFFSSL_BACKEND", "magic")
    with pytest.raises(ValueError, match="EFFSSL_BACKEND"):
        ek.block_match(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), 4, 1)


def test_reference_backend_env(monkeypatch):
    a, b = torch.rand(1, 3, 12, 12), torch.rand(1, 3, 12, 12)
    monkeypatch.setenv("EFFSSL_BACKEND", "reference")
    got = ek.block_match(a, b, 4, 2)
    expect = block_match_reference(a, b, 4, 2)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


# ----------------------------------------------------------------------------- torch.library / compile
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("with_centers", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)  # the fake's float32 PSNR whatever the inputs' dtype
def test_opcheck(device, requires_grad, with_centers, dtype):
    a = torch.rand(2, 3, 12, 14, device=device).to(dtype).requires_grad_(requires_grad)
    b = torch.rand(2, 3, 12, 14, device=device).to(dtype)
    centers = torch.randint(-3, 12, (2, 3, 3, 2), dtype=torch.int32, device=device) if with_centers else None
    flip = torch.tensor([True, False], device=device) if with_centers else None
    torch.library.opcheck(torch.ops.effssl_kernels.block_match.default, (a, b, 4, 2, 1.0, centers, flip))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    def masks(a, b, centers, flip):
        psnr_a, _ = ek.block_match(a, b, 4, 2, centers=centers, flip=flip)
        psnr_b, _ = ek.block_match(b, a, 4, 2)
        return ek.similar_blocks(psnr_a), ek.similar_blocks(psnr_b, 15.0)

    a = torch.rand(2, 3, 16, 16, device=device)
    b = (a + 0.02 * torch.randn_like(a)).clamp(0, 1)
    centers = torch.randint(-2, 14, (2, 4, 4, 2), device=device)
    flip = torch.tensor([False, True], device=device)
    compiled = torch.compile(masks, fullgraph=True, backend="aot_eager")
    for got, expect in zip(compiled(a, b, centers, flip), masks(a, b, centers, flip)):
        assert torch.equal(got, expect)


def test_compile_fullgraph_reference_backend(monkeypatch):
    # the fallback backend compiles too (no data-dependent branch in the reference)
    monkeypatch.setenv("EFFSSL_BACKEND", "reference")
    a, b = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    centers = torch.randint(-6, 14, (2, 4, 4, 2))
    for kw in ({}, dict(centers=centers, flip=torch.tensor([False, True]))):
        torch._dynamo.reset()
        got = torch.compile(lambda x, y: ek.block_match(x, y, 4, 2, **kw), fullgraph=True, backend="aot_eager")(a, b)
        want = block_match_reference(a, b, 4, 2, 1.0, kw.get("centers"), kw.get("flip"))
        assert all(torch.equal(g, w) for g, w in zip(got, want))


# ----------------------------------------------------------------------------- shape fuzzing
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    N=st.integers(1, 2), C=st.integers(1, 4), H=st.integers(1, 19), W=st.integers(1, 19),
    B=st.integers(1, 8), r=st.integers(0, 4), dtype=st.sampled_from(DTYPES),
    use_centers=st.booleans(), use_flip=st.booleans(), seed=st.integers(0, 2**16),
)
def test_fuzz_shapes(N, C, H, W, B, r, dtype, use_centers, use_flip, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(N, C, H, W, generator=g).to(dtype)
    b = torch.rand(N, C, H, W, generator=g).to(dtype)
    if B > min(H, W):
        with pytest.raises(ValueError, match="larger than the image"):
            ek.block_match(a, b, B, r)
        return
    Hb, Wb = H // B, W // B
    centers = torch.randint(-B - r, max(H, W) + r, (N, Hb, Wb, 2), generator=g) if use_centers else None
    flip = torch.rand(N, generator=g) < 0.5 if use_flip else None
    psnr, off = ek.block_match(a, b, B, r, centers=centers, flip=flip)
    assert_block_match(psnr, off, a, b, B, r, centers=centers, flip=flip)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_zero_channels_refused(backend, monkeypatch):
    # C = 0: the reference backend returned NaN psnr for every block silently, the C++ op a
    # RuntimeError; the wrapper refuses it as ValueError on every backend
    monkeypatch.setenv("EFFSSL_BACKEND", backend)
    a = torch.rand(2, 0, 8, 8)
    with pytest.raises(ValueError, match="C must be at least 1"):
        ek.block_match(a, a.clone(), 4, 1)


def test_data_range_bool_refused():
    a = torch.rand(1, 3, 8, 8)
    with pytest.raises(TypeError, match="data_range must be a number"):
        ek.block_match(a, a.clone(), 4, 1, data_range=True)
