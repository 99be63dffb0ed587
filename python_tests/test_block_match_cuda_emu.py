"""block_match's CUDA kernels (csrc/block_match/block_match_kernel.cu) run on the CPU.

No GPU has run these kernels yet, and CI has none. cuda_emu (python_tests/cuda_emu/) compiles the
.cu file with g++ and runs each CUDA thread as a fiber (AddressSanitizer + UBSan build: memory
errors, misaligned vector loads, results) or as an OS thread (ThreadSanitizer build: shared-memory
races). So the launcher's kernel choice, shared-memory layouts, barriers, shuffles and grid-stride
loops are checked against the reference here, on the cases test_block_match_cuda.py runs on a GPU.
The last tests plant a known bug of each kind and check that the emulator reports it.

Emulation is slow (thousands of fiber switches per block), so shapes are small, and large-window
cases keep a few blocks alive by sending the others' search centres far outside the image (a
block without a candidate exits before its first barrier).
"""
import math
import re
import shutil

import pytest
import torch

import cuda_emu
import effssl_kernels as ek
from utils import assert_block_match, make_layout

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

EXPECT = {"extern": 2, "shared": 3, "launches": 3}  # in block_match_kernel.cu: guards cuda_emu's rewrites
PATHS = ["image", "tiled", "direct"]
A100_OPTIN = 166912  # 163 KB opt-in shared memory: fewer channels per chunk


@pytest.fixture(scope="module")
def emu_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cuda_emu"))


def _need(sanitizer):
    if not cuda_emu.sanitizer_available(sanitizer):
        pytest.skip(f"g++ here cannot link -fsanitize={sanitizer} (its runtime library is missing)")


@pytest.fixture(scope="module")
def asan(emu_dir):
    _need("address")
    return cuda_emu.build("block_match", "address", emu_dir, EXPECT)


@pytest.fixture(scope="module")
def tsan(emu_dir):
    _need("thread")
    return cuda_emu.build("block_match", "thread", emu_dir, EXPECT)


def few_live_blocks(N, H, W, B, live):
    """Centres at each block's own place for the (n, i, j) in ``live``, far outside elsewhere."""
    centers = torch.full((N, H // B, W // B, 2), -(10**6), dtype=torch.int32)
    for n, i, j in live:
        centers[n, i, j] = torch.tensor([i * B, j * B])
    return centers


def run(binary, a, b, B, r, **kw):
    """Emulated kernel against the reference (grid capped at 3 CTAs: grid-stride loops run)."""
    check = {k: kw[k] for k in ("centers", "flip", "data_range") if k in kw}
    exact = kw.pop("exact_offsets", False)
    kw.setdefault("max_grid", 3)
    psnr, off = cuda_emu.block_match(binary, a, b, B, r, **kw)
    assert_block_match(psnr, off, a, b, B, r, exact_offsets=exact, **check)
    return psnr, off


# (N, C, H, W, block, radius), dtype, layout: odd sizes, C = 1, radius 0, big blocks, block 1
CASES = [
    ((2, 3, 33, 35, 5, 5), torch.float32, "contiguous"),
    ((1, 1, 17, 23, 3, 2), torch.float16, "channels_last"),
    ((2, 3, 20, 20, 4, 0), torch.bfloat16, "sliced"),
    ((1, 3, 64, 64, 16, 8), torch.float32, "channels_last"),
    ((1, 3, 96, 96, 32, 16), torch.bfloat16, "contiguous"),
    ((1, 2, 70, 41, 40, 3), torch.float16, "contiguous"),
    ((1, 5, 10, 9, 1, 3), torch.float32, "sliced"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{c[2]}")
@pytest.mark.parametrize("path", PATHS)
def test_random(asan, path, case):
    (N, C, H, W, B, r), dtype, layout = case
    a = make_layout(torch.rand(N, C, H, W).to(dtype), layout)
    b = make_layout(torch.rand(N, C, H, W).to(dtype), layout)
    launched = []
    run(asan, a, b, B, r, path=path, launches=launched)
    assert launched == [f"bm_{path}_kernel<T>"]  # the forced kernel, not a fall-through


# The tiled kernel's rarer paths (see TILED_SHAPES in test_block_match_cuda.py): two dx tiles
# per row, channel chunks, the K-split reduction, two passes over the tiles.
TILED = [
    ((1, 2, 60, 60, 8, 17), None),  # ntx = 2, K-split
    ((1, 3, 96, 96, 32, 17), None),  # ntx = 2, nchunks = 2
    ((1, 6, 80, 80, 32, 16), None),  # nchunks = 2, PX 17 and 33
    ((1, 1, 104, 104, 2, 50), [(0, 0, 0), (0, 26, 26), (0, 51, 10), (0, 25, 51)]),  # passes = 2
    ((1, 3, 104, 104, 2, 50), [(0, 1, 1), (0, 30, 20), (0, 51, 51)]),  # passes = 2, nchunks = 2
]


@pytest.mark.parametrize("optin", [None, A100_OPTIN], ids=["h100", "a100"])
@pytest.mark.parametrize("shape,live", TILED, ids=lambda v: str(v) if isinstance(v, tuple) else "")
def test_tiled_kernel_paths(asan, shape, live, optin):
    N, C, H, W, B, r = shape
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(N, C, H, W, generator=g), torch.rand(N, C, H, W, generator=g)
    flip = torch.tensor([True] * N)
    if live is None:
        run(asan, a, b, B, r, path="tiled", smem_optin=optin)
        centers = few_live_blocks(N, H, W, B, [(0, i, j) for i in range(H // B) for j in range(W // B)])
        centers += torch.randint(-2, 3, centers.shape, generator=g, dtype=torch.int32)
    else:
        centers = few_live_blocks(N, H, W, B, live)
    run(asan, a.bfloat16(), b.bfloat16(), B, r, path="tiled", centers=centers, flip=flip, smem_optin=optin)


@pytest.mark.parametrize("path", PATHS)
def test_planted_shift_layouts_flip(asan, path):
    # b is a shifted, mirrored a: the planted shift is the unique exact match (+inf dB)
    N, C, H, W, B, r, dy, dx = 2, 3, 24, 20, 4, 3, 2, -1
    img = torch.rand(N, C, H + 8, W + 8)
    a = img[:, :, 4 : 4 + H, 4 : 4 + W]
    b = img[:, :, 4 - dy : 4 - dy + H, 4 - dx : 4 - dx + W].flip(-1)
    flip = torch.tensor([True, True])
    a, b = make_layout(a.half(), "channels_last"), make_layout(b.half(), "sliced")
    psnr, off = run(asan, a, b, B, r, flip=flip, path=path)
    ys, xs = torch.arange(H // B) * B + dy, torch.arange(W // B) * B + dx
    inside = ((ys >= 0) & (ys <= H - B))[:, None] & ((xs >= 0) & (xs <= W - B))[None, :]
    assert torch.isposinf(psnr[:, inside]).all()
    assert (off[:, inside] == torch.tensor([dy, dx], dtype=torch.int32)).all()


@pytest.mark.parametrize("path", PATHS)
def test_centres_at_and_beyond_the_border(asan, path):
    N, C, H, W, B, r = 2, 3, 24, 24, 6, 2
    a, b = torch.rand(N, C, H, W), torch.rand(N, C, H, W)
    g = torch.Generator().manual_seed(0)
    centers = torch.randint(-12, 36, (N, H // B, W // B, 2), generator=g).int()
    centers[0, 0, 0] = torch.tensor([-100, -100])  # no candidate: -inf
    centers[1, 1, 1] = torch.tensor([2**31 - 1, -(2**31)])
    psnr, _ = run(asan, a, b, B, r, centers=centers, path=path)
    assert torch.isneginf(psnr[0, 0, 0])


@pytest.mark.parametrize("path", PATHS)
def test_nan_ties_identical_and_data_range(asan, path):
    a = (torch.rand(1, 1, 16, 16) > 0.5).float()
    b = (torch.rand(1, 1, 16, 16) > 0.5).float()
    a[0, 0, 5, 5] = float("nan")
    psnr, _ = run(asan, a, b, 4, 3, path=path, exact_offsets=path != "tiled")
    assert torch.isnan(psnr[0, 1, 1])
    a = torch.rand(2, 3, 16, 16) * 255
    psnr, off = run(asan, a, a.clone(), 8, 4, data_range=255.0, path=path)
    assert torch.isposinf(psnr).all() and (off == 0).all()


@pytest.mark.parametrize("path", PATHS)
def test_inf_pixels(asan, path):
    # An inf in b makes the tiled kernel's sum-of-squares form inf - inf = NaN for the windows
    # holding it, while their true mse is +inf: they must lose to the finite candidates (and
    # the block whose exact match avoids the inf keeps its +inf dB), not win as a NaN would.
    a = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[0, 1, 20, 20] = float("inf")
    psnr, off = run(asan, a, b, 16, 8, path=path)
    assert torch.isposinf(psnr[0, 1, 0]) and (off[0, 1, 0] == 0).all()
    assert torch.isfinite(psnr[0, 1, 1])
    # an inf in a: its block's every candidate is +inf, so no candidate (-inf dB, offset 0)
    psnr, off = run(asan, b, a, 16, 8, path=path)
    assert torch.isneginf(psnr[0, 1, 1]) and (off[0, 1, 1] == 0).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("b_pixel", [float("nan"), float("inf")])
def test_inf_in_a_with_a_nan_candidate(asan, path, b_pixel):
    # An inf in a's block and one candidate whose mse is NaN (a NaN in its window, or an inf
    # meeting a's: inf - inf): that candidate wins, NaN dB at its offset, as in the reference.
    # Until 2026-12-06 the tiled kernel, whose centred sums are all NaN once a has an inf, took
    # the first candidate instead (-inf dB, offset (0, 0)).
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 16, 16, generator=g)
    b = torch.rand(1, 1, 16, 16, generator=g)
    a[0, 0, 5, 5] = float("inf")  # block (1, 1)
    y = 9 if math.isnan(b_pixel) else 7  # a NaN in the (2, 2) window only; the inf under a's at (2, 2)
    b[0, 0, y, y] = b_pixel
    want_p, want_o = ek.block_match(a, b, 4, 2)
    assert torch.isnan(want_p[0, 1, 1]) and want_o[0, 1, 1].tolist() == [2, 2]
    psnr, off = run(asan, a, b, 4, 2, path=path)
    assert torch.equal(off, want_o)
    torch.testing.assert_close(psnr, want_p, atol=1e-3, rtol=0, equal_nan=True)


@pytest.mark.parametrize("path", PATHS)
def test_bright_low_contrast_picks_the_exact_winner(asan, path):
    # uint8-range pixels 250 + 4u: the tiled kernel's sum-of-squares form cancels most of float32's
    # digits unless each template is first centred on its channel mean; uncentred, 3 of these
    # 18 blocks pick a worse candidate (within assert_block_match's data_range tolerance, hence
    # exact offsets here: the direct kernels and the reference pick the same)
    g = torch.Generator().manual_seed(0)
    a = 250 + 4 * torch.rand(2, 3, 48, 48, generator=g)
    b = 250 + 4 * torch.rand(2, 3, 48, 48, generator=g)
    run(asan, a, b, 16, 8, data_range=255.0, path=path, exact_offsets=True)


@pytest.mark.parametrize("path", ["image", "direct"])
def test_direct_kernels_pick_the_cpu_kernels_winners(asan, path):
    # Pixels in {0, 1/2, 1}: every partial sum is exact, so the direct kernels must pick exactly
    # the CPU kernel's candidates, ties included (see test_block_match_cuda.py).
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 3, (2, 3, 16, 16), generator=g) / 2
    b = torch.randint(0, 3, (2, 3, 16, 16), generator=g) / 2
    centers = torch.randint(-4, 16, (2, 4, 4, 2), generator=g).int()
    flip = torch.tensor([False, True])
    for kw in ({}, {"centers": centers, "flip": flip}):
        pc, oc = ek.block_match(a, b, 4, 4, **kw)
        pe, oe = cuda_emu.block_match(asan, a, b, 4, 4, path=path, max_grid=3, **kw)
        assert torch.equal(oe, oc)
        torch.testing.assert_close(pe, pc, atol=1e-3, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_same_result_in_any_thread_order(asan, path):
    # A missing barrier shows as a result that depends on which thread runs first.
    a, b = torch.rand(1, 2, 40, 40), torch.rand(1, 2, 40, 40)
    first = cuda_emu.block_match(asan, a, b, 8, 17, path=path, max_grid=2)
    for order in ("reverse", "random:1", "random:2"):
        again = cuda_emu.block_match(asan, a, b, 8, 17, path=path, max_grid=2, order=order)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), order


def test_launcher_falls_back_when_shared_memory_is_short(asan):
    # The image kernel above 48 KB needs the opt-in attribute raised (the launch fails without
    # it); with a 40 KB device neither the image nor the tiled kernel fits and direct runs.
    a, b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    launched = []
    run(asan, a, b, 16, 8, path="image", centers=few_live_blocks(1, 64, 64, 16, [(0, 1, 2), (0, 3, 3)]),
        launches=launched)
    run(asan, a, b, 32, 16, path="tiled", smem_optin=40 * 1024, launches=launched)
    assert launched == ["bm_image_kernel<T>", "bm_direct_kernel<T>"]


def test_static_shared_memory_counts_in_the_48kb_rule(asan):
    # 1 x 37 x 37, block 3, radius 17: the tiled kernel's dynamic shared memory is 48,432 bytes,
    # under 48 KB alone but not with its ~0.8 KB of static __shared__, so the launcher must raise
    # the opt-in attribute (kStaticSmemReserve); test_emulator_reports_planted_bugs removes that.
    a, b = torch.rand(1, 1, 37, 37), torch.rand(1, 1, 37, 37)
    launched = []
    run(asan, a, b, 3, 17, path="tiled", centers=few_live_blocks(1, 37, 37, 3, [(0, 5, 5)]), launches=launched)
    assert launched == ["bm_tiled_kernel<T>"]


@pytest.mark.parametrize("path", PATHS)
def test_no_shared_memory_races(tsan, path):
    # ThreadSanitizer build: CUDA threads are OS threads and barriers are mutexes, so two threads
    # touching one shared word without a barrier between them fail the run. Two CTAs for more
    # blocks: shared memory is reused across the grid-stride loop.
    a, b = torch.rand(1, 2, 24, 24), torch.rand(1, 2, 24, 24)
    run(tsan, a, b, 8, 3, path=path, max_grid=2)
    if path == "tiled":  # K-split with two dx tiles per row; channel chunks of one (small device)
        a, b = torch.rand(1, 3, 60, 60), torch.rand(1, 3, 60, 60)
        run(tsan, a, b, 8, 17, path=path, max_grid=2, centers=few_live_blocks(1, 60, 60, 8, [(0, 3, 3), (0, 0, 6)]))
        run(tsan, a, b, 8, 17, path=path, max_grid=2, smem_optin=36 * 1024,
            centers=few_live_blocks(1, 60, 60, 8, [(0, 2, 4)]))


def test_image_kernel_grid_stride_over_samples(asan):
    # N = 4 samples on at most 3 CTAs: CTA 0 runs samples 0 and 3, reloading shared memory after
    # its barrier (with N <= 2 the image kernel's grid-stride loop never came round)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 2, 16, 16, generator=g), torch.rand(4, 2, 16, 16, generator=g)
    launched = []
    run(asan, a, b, 4, 2, path="image", launches=launched)
    assert launched == ["bm_image_kernel<T>"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("transpose", [False, True])
def test_inf_in_a_border_block_nan_candidate(asan, path, transpose):
    # Border block (0, 1) has a 3 x 5 candidate grid (5 x 3 transposed): the other inf-in-a tests
    # have square grids, which cannot tell Dy from Dx. An inf in a, and a NaN in b that only the
    # candidate (0, +2) reads: it must win (NaN dB at that offset).
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 1, 16, 16, generator=g), torch.rand(1, 1, 16, 16, generator=g)
    a[0, 0, 1, 5] = float("inf")
    b[0, 0, 0, 9] = float("nan")
    if transpose:
        a, b = a.transpose(-1, -2).contiguous(), b.transpose(-1, -2).contiguous()
    want_p, want_o = ek.block_match(a, b, 4, 2)
    blk = (1, 0) if transpose else (0, 1)
    assert torch.isnan(want_p[0][blk]) and want_o[0][blk].tolist() == ([2, 0] if transpose else [0, 2])
    psnr, off = run(asan, a, b, 4, 2, path=path)
    assert off[0][blk].tolist() == want_o[0][blk].tolist()


def test_tiled_rescore_loop_in_any_thread_order(asan):
    # An inf in a: the tiled kernel re-scores every candidate, one block_sum per candidate; a
    # missing barrier there mixes two candidates' sums in some thread orders (reverse shows it)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    a[0, 0, 5, 5] = float("inf")  # block (1, 1), centre (4, 4)
    b[0, 2, 4, 9] = float("nan")  # read by the dx = +2 windows only
    want_p, want_o = ek.block_match(a, b, 4, 2)
    assert torch.isnan(want_p[0, 1, 1]) and want_o[0, 1, 1].tolist() == [0, 2]
    for order in ("forward", "reverse"):
        psnr, off = run(asan, a, b, 4, 2, path="tiled", order=order)
        assert off[0, 1, 1].tolist() == [0, 2]


def test_tiled_px9_at_its_limit(asan):
    # Every interior block has Dx = 9, the widest tile (radius 4): the layout sizes the K-split
    # partial sums for PX = 9, so the kernel must pick PX = 9 there too (else they run past the
    # dynamic shared memory: ASan)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 2, 48, 48, generator=g), torch.rand(1, 2, 48, 48, generator=g)
    run(asan, a, b, 16, 4, path="tiled")


# Planted bugs, one per kind of check: each build must fail its case.
BARRIER = "      __syncthreads();  // every group is done reading the template and window (region R)\n"
MUTATIONS = {  # name: (sanitizer, old, new, what the run reports; None: a wrong answer)
    # the K-split overwrites the staged window while other groups still read it
    "race": ("address", BARRIER, "\n", None),
    "race-tsan": ("thread", BARRIER, "\n", "ThreadSanitizer: data race"),
    "overflow": ("address", "  bytes = floats_for(cc) * 4;", "  bytes = floats_for(cc) * 4 - 64;",
                 "AddressSanitizer"),
    "misaligned": ("address", "const long long TP = round4(B);", "const long long TP = round4(B) + 1;",
                   "misaligned address"),
    "static-reserve": ("address", "constexpr long long kStaticSmemReserve = 1024;",
                       "constexpr long long kStaticSmemReserve = 0;",
                       "static + dynamic shared memory above 48 KB"),
    "launch-bounds": ("address", "__launch_bounds__(kTileThreads, 2)", "__launch_bounds__(256, 2)",
                      "more threads than the kernel's __launch_bounds__"),
}


@pytest.mark.parametrize("bug", list(MUTATIONS))
def test_emulator_reports_planted_bugs(emu_dir, bug):
    sanitizer, old, new, report = MUTATIONS[bug]
    _need(sanitizer)
    binary = cuda_emu.build("block_match", sanitizer, emu_dir, EXPECT, mutation=(old, new), name=f"_{bug}")
    if bug == "static-reserve":
        a, b = torch.rand(1, 1, 37, 37), torch.rand(1, 1, 37, 37)
        args = (3, 17)
        kw = dict(centers=few_live_blocks(1, 37, 37, 3, [(0, 5, 5)]))
    else:
        a, b = torch.rand(1, 2, 24, 24), torch.rand(1, 2, 24, 24)
        args, kw = (8, 3), {}
    if report is None:  # runs cleanly, answers wrong
        psnr, off = cuda_emu.block_match(binary, a, b, *args, path="tiled", max_grid=2, **kw)
        with pytest.raises(AssertionError):
            assert_block_match(psnr, off, a, b, *args, **kw)
    elif sanitizer == "thread":
        # ThreadSanitizer keeps four shadow cells per word, and hundreds of threads read the racy
        # words: which accesses it still holds when the write comes depends on the OS schedule, so
        # one run can miss the race (once in about twenty, on a loaded machine). Up to three runs.
        for _ in range(3):
            try:
                cuda_emu.block_match(binary, a, b, *args, path="tiled", max_grid=2, **kw)
            except AssertionError as e:
                assert report in str(e), str(e)
                break
        else:
            pytest.fail(f"three runs under ThreadSanitizer did not report {report!r}")
    else:
        with pytest.raises(AssertionError, match=re.escape(report)):
            cuda_emu.block_match(binary, a, b, *args, path="tiled", max_grid=2, **kw)
