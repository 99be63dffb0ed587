"""block_match's three CUDA kernels (image / tiled / direct), each forced, against the reference.

The launcher picks a kernel by shape; EFFSSL_BLOCK_MATCH_CUDA_PATH forces one so every kernel is
checked on every case (a forced kernel that cannot run a shape falls through to the next one).
Runs only where a GPU is present; test_block_match_cuda_emu.py runs the same kernels on the CPU
under cuda_emu and sanitizers.
"""
import pytest
import torch

import effssl_kernels as ek
from utils import DTYPES, assert_block_match, make_layout, requires_gpu

pytestmark = [requires_gpu, pytest.mark.cuda]

PATHS = ["image", "tiled", "direct"]
# (N, C, H, W, block, radius): CIFAR-like, odd sizes, C=1, radius 0, big blocks, ImageNet-like.
SHAPES = [
    (3, 3, 32, 32, 4, 4),
    (2, 3, 33, 35, 5, 5),
    (2, 1, 17, 23, 3, 2),
    (2, 3, 20, 20, 4, 0),
    (1, 3, 64, 64, 16, 8),
    (2, 3, 96, 96, 32, 16),
    (1, 2, 70, 41, 40, 3),
    (2, 5, 48, 48, 1, 3),
]

# Shapes that reach the tiled kernel's rarer paths, none of which SHAPES above reaches (there
# every block has one dx tile per row, one pass and one channel chunk). Each was checked with
# the review's layout.py, a Python replay of make_tiled_layout and of tiled_cross's tile
# arithmetic, run for every block (H100 opt-in limit 227 KB; an A100's 163 KB gives the same
# paths):
TILED_SHAPES = [  # N, C, H, W, block, radius
    # Dx = 35 > 33: ntx = 2 dx tiles per row (PX = 33, stride 32, `own` clipping); one pass,
    # one chunk (Cc = 2), so the K-split reduction also maps two tiles per row
    (1, 2, 60, 60, 8, 17),
    # ntx = 2 and nchunks = 2 (Cc = 2: chunks of 2 + 1 channels, re-staged, sq accumulated)
    (1, 3, 96, 96, 32, 17),
    # the default radius B/2 with C = 6 > Cc = 4: nchunks = 2; PX 17 and 33 both occur
    (1, 6, 80, 80, 32, 16),
    # Dx = 101: ntx = 4, Dy * ntx = 404 > 288 tiles: passes = 2 (KS = 1), one chunk, so the
    # staged template and window are reused by the second pass (133 KB: the opt-in limit)
    (1, 1, 104, 104, 2, 50),
    # passes = 2 with nchunks = 2 (Cc = 2; Cc = 1, nchunks = 3 on an A100): re-staged per pass
    (1, 3, 104, 104, 2, 50),
]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("EFFSSL_BLOCK_MATCH_CUDA_PATH", request.param)
    monkeypatch.setenv("EFFSSL_BACKEND", "cuda")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random(path, dtype, shape):
    N, C, H, W, B, r = shape
    a = torch.rand(N, C, H, W, device="cuda").to(dtype)
    b = torch.rand(N, C, H, W, device="cuda").to(dtype)
    psnr, off = ek.block_match(a, b, B, r)
    assert_block_match(psnr, off, a, b, B, r)


@pytest.mark.parametrize("shape", TILED_SHAPES, ids=str)
def test_tiled_kernel_paths(path, shape):
    # Every kernel forced on the small-radius shapes (image falls through to tiled where the
    # image exceeds shared memory); r = 50, whose reference check takes 5-10 s a call, runs
    # once, on the tiled kernel it is there for.
    N, C, H, W, B, r = shape
    slow = r > 32
    if slow and path != "tiled":
        pytest.skip("r = 50 shapes test the tiled kernel's passes")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(N, C, H, W, generator=g).cuda()
    b = torch.rand(N, C, H, W, generator=g).cuda()
    if not slow:
        psnr, off = ek.block_match(a, b, B, r)
        assert_block_match(psnr, off, a, b, B, r)
        a, b = a.bfloat16(), b.bfloat16()  # converted while staging
    # Centres jittered by up to 2 px around each block's own place and a flip that is a
    # stride-2 view, as flips[:, 0]. The same replay with these centres: the chunks are
    # unchanged, 16 of 21 blocks keep ntx = 2 on the first shape, 302 and 313 of 2704 take two
    # passes on the last two.
    ys, xs = torch.meshgrid(torch.arange(H // B) * B, torch.arange(W // B) * B, indexing="ij")
    centers = torch.stack([ys, xs], -1)[None] + torch.randint(-2, 3, (N, H // B, W // B, 2), generator=g)
    flips = torch.tensor([[True, False]] * N, device="cuda")
    psnr, off = ek.block_match(a, b, B, r, centers=centers.cuda(), flip=flips[:, 0])
    assert_block_match(psnr, off, a, b, B, r, centers=centers, flip=flips[:, 0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_planted_shift_layouts_flip_centres(path, dtype):
    # b is a shifted and mirrored a: with centres at each block's own place the planted shift is
    # the unique exact match (psnr +inf) wherever it lies inside b.
    N, C, H, W, B, r, dy, dx = 2, 3, 48, 40, 8, 5, 3, -2
    img = torch.rand(N, C, H + 16, W + 16, device="cuda")
    a = img[:, :, 8 : 8 + H, 8 : 8 + W]
    b = img[:, :, 8 - dy : 8 - dy + H, 8 - dx : 8 - dx + W].flip(-1)
    flip = torch.tensor([True, True], device="cuda")
    a, b = make_layout(a.to(dtype), "channels_last"), make_layout(b.to(dtype), "sliced")
    psnr, off = ek.block_match(a, b, B, r, flip=flip)
    assert_block_match(psnr, off, a, b, B, r, flip=flip)
    Hb, Wb = H // B, W // B
    ys = torch.arange(Hb, device="cuda") * B + dy
    xs = torch.arange(Wb, device="cuda") * B + dx
    inside = ((ys >= 0) & (ys <= H - B))[:, None] & ((xs >= 0) & (xs <= W - B))[None, :]
    assert torch.isposinf(psnr[:, inside]).all()
    assert (off[:, inside] == torch.tensor([dy, dx], device="cuda", dtype=torch.int32)).all()


def test_centres_at_and_beyond_the_border(path):
    N, C, H, W, B, r = 2, 3, 24, 24, 6, 2
    a, b = torch.rand(N, C, H, W, device="cuda"), torch.rand(N, C, H, W, device="cuda")
    g = torch.Generator().manual_seed(0)
    centers = torch.randint(-12, 36, (N, H // B, W // B, 2), generator=g).to("cuda")
    centers[0, 0, 0] = torch.tensor([-100, -100])  # no candidate: -inf
    centers[1, 1, 1] = torch.tensor([2**31 - 1, -(2**31)])
    psnr, off = ek.block_match(a, b, B, r, centers=centers.int())
    assert_block_match(psnr, off, a, b, B, r, centers=centers.int())
    assert torch.isneginf(psnr[0, 0, 0])


def test_nan_and_ties(path):
    a = (torch.rand(2, 1, 24, 24, device="cuda") > 0.5).float()
    b = (torch.rand(2, 1, 24, 24, device="cuda") > 0.5).float()
    a[0, 0, 5, 5] = float("nan")
    b[1, 0, 13, 7] = float("nan")
    psnr, off = ek.block_match(a, b, 4, 3)
    # Direct kernels sum exact integers here, so ties resolve exactly as the reference's; the
    # tiled kernel ranks by the a^2+b^2-2ab identity and may pick any candidate within 1e-4.
    assert_block_match(psnr, off, a, b, 4, 3, exact_offsets=path != "tiled")
    assert torch.isnan(psnr[0, 1, 1])
    assert not ek.similar_blocks(psnr, -1e9)[0, 1, 1]


def test_identical_views_and_data_range(path):
    a = torch.rand(3, 3, 40, 40, device="cuda") * 255
    psnr, off = ek.block_match(a, a.clone(), 8, 4, data_range=255.0)
    assert torch.isposinf(psnr).all() and (off == 0).all()
    b = a + torch.randn_like(a)
    psnr, off = ek.block_match(a, b, 8, 4, data_range=255.0)
    assert_block_match(psnr, off, a, b, 8, 4, data_range=255.0)


def test_matches_cpu_kernel_bitwise_offsets(path):
    # Same data on both devices. Pixels in {0, 1/2, 1} make every partial sum of squares exact in
    # float32 (multiples of 1/4 below 48), so no summation order changes a key and the direct
    # kernels (image, direct) must pick exactly the CPU kernel's winners, about 1 block in 8 by
    # the tie rule alone (the tie rule is a total order). The tiled kernel ranks by the
    # a^2+b^2-2ab identity: it gets SEMANTICS.md's 1e-4 tolerance. psnr within 1e-3 dB.
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 3, (4, 3, 32, 32), generator=g) / 2
    b = torch.randint(0, 3, (4, 3, 32, 32), generator=g) / 2
    centers = torch.randint(-4, 32, (4, 8, 8, 2), generator=g)
    flip = torch.tensor([False, True, False, True])
    for kw in ({}, {"centers": centers, "flip": flip}):
        pc, oc = ek.block_match(a, b, 4, 4, **kw)
        pg, og = ek.block_match(a.cuda(), b.cuda(), 4, 4, **{k: v.cuda() for k, v in kw.items()})
        if path != "tiled":
            assert torch.equal(og.cpu(), oc)
        torch.testing.assert_close(pg.cpu(), pc, atol=1e-3, rtol=0)
        assert_block_match(pg, og, a, b, 4, 4, exact_offsets=path != "tiled", **kw)


def test_bright_low_contrast(path):
    # uint8-range pixels 250 + 4u (test_block_match_cuda_emu.py has the same case): without
    # centring each template on its channel mean, the tiled kernel's sum-of-squares form loses
    # the digits that rank the candidates, and a few blocks pick one ~0.006 dB worse
    g = torch.Generator().manual_seed(0)
    a = 250 + 4 * torch.rand(2, 3, 48, 48, generator=g)
    b = 250 + 4 * torch.rand(2, 3, 48, 48, generator=g)
    pc, oc = ek.block_match(a, b, 16, 8, data_range=255.0)
    pg, og = ek.block_match(a.cuda(), b.cuda(), 16, 8, data_range=255.0)
    if path != "tiled":
        assert torch.equal(og.cpu(), oc)
    assert (pg.cpu() >= pc - 1e-3).all(), (pc - pg.cpu()).max()
    assert_block_match(pg, og, a, b, 16, 8, data_range=255.0)


def test_deterministic(path):
    a, b = torch.rand(8, 3, 64, 64, device="cuda"), torch.rand(8, 3, 64, 64, device="cuda")
    first = ek.block_match(a, b, 16, 8)
    for _ in range(3):
        again = ek.block_match(a, b, 16, 8)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
