"""crop_centers and TwoViewCrop: counterpart geometry for block_match, checked on real photos."""
import functools
import math
import pathlib
import pickle
import subprocess
import sys
from fractions import Fraction as Fr

import numpy as np
import pytest
import torch
from skimage import data as skdata
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from effssl_kernels import block_match
from effssl_kernels.transforms import TwoViewCrop, TwoViews, crop_centers
from utils import requires_gpu

S = 64  # view side
B = 8  # block side
R = 2  # search radius
IMAGES = ["astronaut", "chelsea", "coffee"]


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> torch.Tensor:
    """A scikit-image photo as float32 [3, H, W] in [0, 1] (shipped with skimage: no download)."""
    arr = getattr(skdata, name)()
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(255.0)


def photo(name: str) -> torch.Tensor:
    return _photo(name).clone()


def slice_view(img, box, flip):
    """A same-size crop cut by indexing (independent of torchvision), mirrored if ``flip``."""
    t, l, h, w = (int(v) for v in box)
    v = img[:, t : t + h, l : l + w]
    return v.flip(-1) if flip else v


def expected_centers_same_size(box_a, box_b, flip_a, size, bs):
    """Hand derivation for equal box sizes, pixel by pixel: [Hb, Wb, 2] int64.

    A's displayed column q is source column la + (size-1-q if flip_a else q); B (before its
    mirror) holds source column s at s - lb; the search frame is B mirrored iff A is. The block's
    top-left is the least mapped row and column of its pixels.
    """
    ta, la = int(box_a[0]), int(box_a[1])
    tb, lb = int(box_b[0]), int(box_b[1])
    hb = wb = size // bs
    out = torch.empty(hb, wb, 2, dtype=torch.int64)
    for i in range(hb):
        for j in range(wb):
            rows = [ta + y - tb for y in range(i * bs, (i + 1) * bs)]
            cols = []
            for q in range(j * bs, (j + 1) * bs):
                c = la + (size - 1 - q if flip_a else q) - lb
                cols.append(size - 1 - c if flip_a else c)
            out[i, j, 0] = min(rows)
            out[i, j, 1] = min(cols)
    return out


def _random_same_size_pairs(img, gen, k):
    """k box pairs of S x S at shifts from 0 to beyond the view (no overlap)."""
    _, H, W = img.shape
    shifts = [(0, 0), (1, -1), (-13, 27), (30, -41), (-5, 3), (S + 6, 0)]
    pairs = []
    for dy, dx in shifts[:k]:
        lo_y, hi_y = max(0, -dy), min(H - S, H - S - dy)
        lo_x, hi_x = max(0, -dx), min(W - S, W - S - dx)
        ta = int(torch.randint(lo_y, hi_y + 1, (1,), generator=gen))
        la = int(torch.randint(lo_x, hi_x + 1, (1,), generator=gen))
        pairs.append(((ta, la, S, S), (ta + dy, la + dx, S, S)))
    return pairs


def _check_exact_direction(img, boxes_a, boxes_b, fa, fb):
    """crop_centers + block_match on same-size crops: (0, 0) / +inf wherever B holds the block."""
    N = len(boxes_a)
    va = torch.stack([slice_view(img, b, fa) for b in boxes_a])
    vb = torch.stack([slice_view(img, b, fb) for b in boxes_b])
    flips_a = torch.full((N,), fa, dtype=torch.bool)
    flips_b = torch.full((N,), fb, dtype=torch.bool)
    centers, flip = crop_centers(torch.tensor(boxes_a), torch.tensor(boxes_b), flips_a, flips_b, (S, S), B)
    assert centers.dtype == torch.int64 and centers.shape == (N, S // B, S // B, 2)
    assert flip.dtype == torch.bool and torch.equal(flip, flips_a ^ flips_b)
    want = torch.stack([expected_centers_same_size(a, b, fa, S, B) for a, b in zip(boxes_a, boxes_b)])
    assert torch.equal(centers, want)

    psnr, offset = block_match(va, vb, B, R, centers=centers, flip=flip)
    cy, cx = centers[..., 0], centers[..., 1]
    inside = (cy >= 0) & (cy <= S - B) & (cx >= 0) & (cx <= S - B)
    reach = (cy >= -R) & (cy <= S - B + R) & (cx >= -R) & (cx <= S - B + R)
    assert inside.any() and (~reach).any() and (reach & ~inside).any()  # all three cases occur
    assert torch.isposinf(psnr[inside]).all()
    assert (offset[inside] == 0).all()
    assert torch.isneginf(psnr[~reach]).all()
    assert (offset[~reach] == 0).all()
    # Partly outside: the best candidate is a real block of B, pushed inside by the offset.
    edge = reach & ~inside
    assert torch.isfinite(psnr[edge]).all()
    y0, x0 = cy + offset[..., 0], cx + offset[..., 1]
    assert ((y0 >= 0) & (y0 <= S - B) & (x0 >= 0) & (x0 <= S - B))[edge].all()


@pytest.mark.parametrize("flip_a,flip_b", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("name", IMAGES)
def test_same_size_crops_match_exactly(name, flip_a, flip_b):
    img = photo(name)
    gen = torch.Generator().manual_seed(IMAGES.index(name))
    pairs = _random_same_size_pairs(img, gen, 6)
    boxes_a = [p[0] for p in pairs]
    boxes_b = [p[1] for p in pairs]
    _check_exact_direction(img, boxes_a, boxes_b, flip_a, flip_b)
    # The reverse direction (B's blocks searched in A) is the same call with the roles swapped.
    _check_exact_direction(img, boxes_b, boxes_a, flip_b, flip_a)


def test_centers_by_hand():
    """A few blocks worked out on paper: box A (10, 20), box B (30, 5), both 64 x 64, B = 8."""
    ba = torch.tensor([[10, 20, 64, 64]] * 4)
    bb = torch.tensor([[30.0, 5.0, 64.0, 64.0]] * 4)  # float boxes give the same integer answer
    fa = torch.tensor([False, False, True, True])
    fb = torch.tensor([False, True, False, True])
    centers, flip = crop_centers(ba, bb, fa, fb, (64, 64), 8)
    assert flip.tolist() == [False, True, True, False]
    # Rows shift by ta - tb = -20 always. Columns: +15 (la - lb) without A's flip; with it the
    # frame is mirrored, so -15. flip_b changes only ``flip``.
    for n, sx in enumerate([15, 15, -15, -15]):
        assert centers[n, 0, 0].tolist() == [-20, 0 + sx]
        assert centers[n, 3, 5].tolist() == [24 - 20, 40 + sx]
        assert centers[n, 7, 7].tolist() == [56 - 20, 56 + sx]
    # Rescale: box B twice A's size at the same top-left. A's block (1, 1) centre (12, 12) ->
    # source (22, 32) -> B (6, 6) -> top-left (2, 2); block (7, 3) centre (60, 28) -> (30, 14)
    # -> (26, 10).
    c2, _ = crop_centers(
        torch.tensor([[10, 20, 64, 64]]), torch.tensor([[10, 20, 128, 128]]),
        torch.tensor([False]), torch.tensor([False]), 64, 8,
    )
    assert c2[0, 1, 1].tolist() == [2, 2]
    assert c2[0, 7, 3].tolist() == [26, 10]
    # Ties round half up: A one row lower (ta = 11), so block (1, .) centre row 12 -> source 23
    # -> B 6.5 -> top-left 2.5 -> 3, and block (2, .) -> 6.5 -> 7 (half-to-even gives 2 and 6).
    c_tie, _ = crop_centers(
        torch.tensor([[11, 20, 64, 64]]), torch.tensor([[10, 20, 128, 128]]),
        torch.tensor([False]), torch.tensor([False]), 64, 8,
    )
    assert c_tie[0, 1, 1].tolist() == [3, 2]
    assert c_tie[0, 2, 1].tolist() == [7, 2]
    # Non-square view and a leftover column (70 // 8 = 8 blocks): block (0, 8) is not returned.
    c3, _ = crop_centers(
        torch.tensor([[0, 0, 48, 70]]), torch.tensor([[0, 0, 48, 70]]),
        torch.tensor([True]), torch.tensor([False]), (48, 70), 8,
    )
    assert c3.shape == (1, 6, 8, 2)
    # Mirrored frame of a 70-wide view: block j's centre 8j + 4 -> 70 - (8j + 4) -> back to
    # 8j + 4 after the frame's mirror; top-left 8j.
    assert c3[0, 2, :, 1].tolist() == [8 * j for j in range(8)]
    assert c3[0, :, 0, 0].tolist() == [8 * i for i in range(6)]


def _exact_centers(box_a, box_b, flip_a, view, bs):
    """crop_centers' map (steps 1-6 of its derivation) in exact rational arithmetic for a view of
    ``view`` = H or (H, W): (rows [Hb], cols [Wb]) of python ints, ties rounded half up."""
    H, W = (view, view) if isinstance(view, int) else view
    ta, la, ha, wa = (Fr(v) for v in box_a)
    tb, lb, hb, wb = (Fr(v) for v in box_b)
    rows = [math.floor((ta + Fr(2 * i + 1, 2) * bs * ha / H - tb) * H / hb - Fr(bs, 2) + Fr(1, 2))
            for i in range(H // bs)]
    cols = []
    for j in range(W // bs):
        xa = Fr(2 * j + 1, 2) * bs
        xa = W - xa if flip_a else xa
        xb = (la + xa * wa / W - lb) * W / wb
        xb = W - xb if flip_a else xb
        cols.append(math.floor(xb - Fr(bs, 2) + Fr(1, 2)))
    return rows, cols


def test_crop_centers_exact_half_ties():
    """Integer boxes round exact .5 ties up even when rescaled (float64 put this one just below
    .5: centre row 47 instead of 48), whatever the boxes' dtype."""
    f = torch.tensor([False])
    ba, bb = torch.tensor([[109, 0, 383, 224]]), torch.tensor([[146, 0, 352, 224]])
    rows, _ = _exact_centers(ba[0].tolist(), bb[0].tolist(), False, 224, 32)
    assert rows[2] == 48  # (109 + 80 * 383 / 224 - 146) * 224 / 352 - 16 = 95 / 2 exactly
    for dtype in (torch.int64, torch.float32, torch.float64):
        c, _ = crop_centers(ba.to(dtype), bb.to(dtype), f, f, 224, 32)
        assert c[0, :, 0, 0].tolist() == rows
    # Random integer boxes (every one exact, flips included) and random fractional ones (the
    # float path, where ties have probability 0) in one batch, against exact arithmetic.
    g = torch.Generator().manual_seed(0)
    N = 400
    boxes = torch.cat([torch.randint(0, 300, (2, N, 2), generator=g), torch.randint(20, 400, (2, N, 2), generator=g)], -1)
    frac = torch.arange(N) % 4 == 3
    boxes = torch.where(frac[:, None], boxes + torch.rand(2, N, 4, generator=g, dtype=torch.float64), boxes)
    fa = torch.rand(N, generator=g) < 0.5
    fb = torch.rand(N, generator=g) < 0.5
    c, _ = crop_centers(boxes[0], boxes[1], fa, fb, 224, 32)
    c32, _ = crop_centers(boxes[0].float(), boxes[1].float(), fa, fb, 224, 32)
    ints = ~frac
    assert torch.equal(c32[ints], c[ints])  # RandomResizedCrop's float32 boxes: the same answer
    for n in range(N):
        rows, cols = _exact_centers(boxes[0, n].tolist(), boxes[1, n].tolist(), bool(fa[n]), 224, 32)
        assert c[n, :, 0, 0].tolist() == rows and c[n, 0, :, 1].tolist() == cols, n


def test_crop_centers_mixed_and_out_of_range_boxes():
    # one box integer and the other not: the float path (the exact one needs both boxes)
    g = torch.Generator().manual_seed(1)
    N = 40
    ba = torch.cat([torch.randint(0, 300, (N, 2), generator=g), torch.randint(20, 400, (N, 2), generator=g)], -1)
    bb = ba.roll(1, 0).double() + torch.rand(N, 4, generator=g, dtype=torch.float64)
    fa = torch.rand(N, generator=g) < 0.5
    for a, b in ((ba, bb), (bb, ba)):
        c, _ = crop_centers(a, b, fa, fa, 224, 32)
        for n in range(N):
            rows, cols = _exact_centers(a[n].tolist(), b[n].tolist(), bool(fa[n]), 224, 32)
            assert c[n, :, 0, 0].tolist() == rows and c[n, 0, :, 1].tolist() == cols, n
    # an exact .5 tie on the float path rounds half up too (torch.round would give 0, 8, 16, ...)
    f = torch.tensor([False])
    c, _ = crop_centers(torch.tensor([[0.5, 0.0, 64.0, 64.0]]), torch.tensor([[0.0, 0.0, 64.0, 64.0]]), f, f, 64, 8)
    assert c[0, :, 0, 0].tolist() == [1 + 8 * i for i in range(8)]
    # integer values past 2^31 leave the int64 path (2 H (ta - tb) would wrap): far outside
    c, _ = crop_centers(torch.tensor([[2.0**58, 0.0, 64.0, 64.0]], dtype=torch.float64),
                        torch.tensor([[0.0, 0.0, 64.0, 64.0]], dtype=torch.float64), f, f, 32, 8)
    assert (c[0, :, :, 0] == 1 << 30).all()


def test_crop_centers_boxes_without_area():
    """A zero, negative or NaN height/width of either box sends all of that sample's centres
    far outside, so its blocks have no candidate; the other samples are unaffected."""
    good = [4.0, 6.0, 40.0, 48.0]
    bad = [[4, 6, 0, 48], [4, 6, 40, -48], [4, 6, float("nan"), 48]]
    ba = torch.tensor([good] + bad + [good] * 3)
    bb = torch.tensor([good] * 4 + bad)
    fa = torch.tensor([False, True, False, True, False, True, False])
    fb = torch.zeros(7, dtype=torch.bool)
    centers, flip = crop_centers(ba, bb, fa, fb, 32, 8)
    assert (centers[1:] == -(1 << 30)).all()
    ref, _ = crop_centers(ba[:1], bb[:1], fa[:1], fb[:1], 32, 8)
    assert torch.equal(centers[:1], ref) and (centers[0].abs() < 32).all()
    psnr, _ = block_match(torch.rand(7, 3, 32, 32), torch.rand(7, 3, 32, 32), 8, 2, centers=centers, flip=flip)
    assert torch.isneginf(psnr[1:]).all() and torch.isfinite(psnr[0]).all()


def _ramp(H, W):
    """[3, H, W]: channel 0 = y, channel 1 = x of each pixel centre (continuous source coords)."""
    y = (torch.arange(H, dtype=torch.float32) + 0.5).view(H, 1).expand(H, W)
    x = (torch.arange(W, dtype=torch.float32) + 0.5).view(1, W).expand(H, W)
    return torch.stack([y, x, torch.zeros(H, W)])


def _block_means(v, cy, cx, bs):
    """Mean of each channel over the bs x bs block at top-left (cy, cx) of v [C, H, W]."""
    return v[:, cy : cy + bs, cx : cx + bs].mean(dim=(1, 2))


@pytest.mark.parametrize("seed", [0, 1])
def test_rescaled_centers_land_on_the_scene_point(seed):
    """Views of a coordinate ramp at different scales: the block found at ``centers`` in B
    shows the same source point as A's block, to within the rounding of the centre."""
    gen = torch.Generator().manual_seed(seed)
    H0, W0 = 320, 400
    src = _ramp(H0, W0)
    N = 12
    boxes_a, boxes_b = [], []
    for _ in range(N):
        ha, wa = (int(v) for v in torch.randint(60, 180, (2,), generator=gen))
        s = torch.empty(2).uniform_(0.6, 1.6, generator=gen)
        hb, wb = int(ha * s[0]), int(wa * s[1])
        ta = int(torch.randint(0, H0 - ha + 1, (1,), generator=gen))
        la = int(torch.randint(0, W0 - wa + 1, (1,), generator=gen))
        # B overlaps A: its centre within a quarter of A's size of A's centre.
        cyb = ta + ha / 2 + float(torch.empty(()).uniform_(-0.25, 0.25, generator=gen)) * ha
        cxb = la + wa / 2 + float(torch.empty(()).uniform_(-0.25, 0.25, generator=gen)) * wa
        tb = min(max(int(cyb - hb / 2), 0), H0 - hb)
        lb = min(max(int(cxb - wb / 2), 0), W0 - wb)
        boxes_a.append((ta, la, ha, wa))
        boxes_b.append((tb, lb, hb, wb))
    flips_a = torch.rand(N, generator=gen) < 0.5
    flips_b = torch.rand(N, generator=gen) < 0.5
    assert flips_a.any() and (~flips_a).any() and (flips_a ^ flips_b).any()

    def view(box, f):
        v = TF.resized_crop(src, *box, size=[S, S], antialias=True)
        return TF.horizontal_flip(v) if f else v

    va = [view(b, f) for b, f in zip(boxes_a, flips_a.tolist())]
    vb = [view(b, f) for b, f in zip(boxes_b, flips_b.tolist())]
    centers, flip = crop_centers(torch.tensor(boxes_a), torch.tensor(boxes_b), flips_a, flips_b, S, B)
    errs = []
    nb = S // B
    for n in range(N):
        frame = vb[n].flip(-1) if flip[n] else vb[n]  # what block_match searches
        hb, wb = boxes_b[n][2], boxes_b[n][3]
        # Interior only: the views' outer pixels are biased by the clamped/truncated filter.
        for i in range(1, nb - 1):
            for j in range(1, nb - 1):
                cy, cx = (int(v) for v in centers[n, i, j])
                if not (2 <= cy <= S - B - 2 and 2 <= cx <= S - B - 2):
                    continue
                pa = _block_means(va[n], i * B, j * B, B)
                pb = _block_means(frame, cy, cx, B)
                # Source-coordinate difference in B's pixels.
                errs.append([float(pb[0] - pa[0]) * S / hb, float(pb[1] - pa[1]) * S / wb])
    errs = torch.tensor(errs)
    assert len(errs) >= 150, len(errs)
    assert errs.abs().max() <= 1.0  # the brief's bound
    # Rounding the centre to a whole pixel costs at most 1/2; the interpolation of a linear ramp
    # away from the border is exact to float rounding.
    assert errs.abs().max() <= 0.5 + 1e-3, errs.abs().max()


def _rescaled_pairs(img, gen, n, scale_range):
    """n overlapping box pairs whose side ratio B/A lies in scale_range, plus random flips."""
    _, H, W = img.shape
    boxes_a, boxes_b = [], []
    for _ in range(n):
        sa = int(torch.randint(88, 112, (1,), generator=gen))
        sb = int(sa * float(torch.empty(()).uniform_(*scale_range, generator=gen)))
        ta = int(torch.randint(0, H - max(sa, sb) + 1, (1,), generator=gen))
        la = int(torch.randint(0, W - max(sa, sb) + 1, (1,), generator=gen))
        dy, dx = (int(v) for v in torch.randint(-12, 13, (2,), generator=gen))
        tb = min(max(ta + dy, 0), H - sb)
        lb = min(max(la + dx, 0), W - sb)
        boxes_a.append((ta, la, sa, sa))
        boxes_b.append((tb, lb, sb, sb))
    return torch.tensor(boxes_a), torch.tensor(boxes_b)


@pytest.mark.parametrize("name", IMAGES)
def test_rescaled_real_photo_centers_beat_the_default(name):
    img = photo(name)
    gen = torch.Generator().manual_seed(10 + IMAGES.index(name))
    N = 8
    boxes_a, boxes_b = _rescaled_pairs(img, gen, N, (1.1, 1.3))
    flips_a = torch.rand(N, generator=gen) < 0.5
    flips_b = torch.rand(N, generator=gen) < 0.5

    def views(boxes, flips):
        out = []
        for box, f in zip(boxes.tolist(), flips.tolist()):
            v = TF.resized_crop(img, *box, size=[S, S], antialias=True)
            out.append(TF.horizontal_flip(v) if f else v)
        return torch.stack(out)

    va, vb = views(boxes_a, flips_a), views(boxes_b, flips_b)
    centers, flip = crop_centers(boxes_a, boxes_b, flips_a, flips_b, S, B)
    psnr_c, _ = block_match(va, vb, B, R, centers=centers, flip=flip)
    psnr_plain, _ = block_match(va, vb, B, R)  # SimWnW's option (a): same position, no geometry
    psnr_flip, _ = block_match(va, vb, B, R, flip=flip)  # mirrored right, positions not mapped
    cy, cx = centers[..., 0], centers[..., 1]
    interior = (cy >= 0) & (cy <= S - B) & (cx >= 0) & (cx <= S - B)
    assert interior.sum() >= 0.5 * interior.numel()
    pc = psnr_c[interior]
    assert (pc > psnr_plain[interior]).float().mean() >= 0.8
    assert (pc > psnr_flip[interior]).float().mean() >= 0.8
    assert pc.median() >= 25.0, pc.median()


def _sources(h=300, w=400):
    return torch.stack([photo(n)[:, :h, :w] for n in IMAGES])


def test_two_view_crop_records_reproduce_its_views():
    img = photo("astronaut")
    crop = TwoViewCrop(S, scale=(0.1, 0.6), generator=torch.Generator().manual_seed(0))
    seen_flips, seen_boxes = set(), set()
    for _ in range(8):
        out = crop(img)
        assert isinstance(out, TwoViews)
        for view, box, f in ((out.view_a, out.box_a, out.flip_a), (out.view_b, out.box_b, out.flip_b)):
            assert view.shape == (3, S, S) and view.dtype == torch.float32
            assert box.shape == (4,) and box.dtype == torch.float32
            assert f.shape == () and f.dtype == torch.bool
            t, l, h, w = (int(v) for v in box)
            assert torch.equal(box, torch.tensor([t, l, h, w], dtype=torch.float32))
            assert 0 <= t and t + h <= 512 and 0 <= l and l + w <= 512
            assert 0.09 <= h * w / 512**2 <= 0.61
            ref = TF.resized_crop(img, t, l, h, w, size=[S, S], antialias=True)
            ref = TF.horizontal_flip(ref) if bool(f) else ref
            assert torch.equal(view, ref)
            seen_flips.add(bool(f))
            seen_boxes.add((t, l, h, w))
    assert seen_flips == {False, True}
    assert len(seen_boxes) == 16


def test_two_view_crop_rng(monkeypatch):
    img = photo("chelsea")
    state = torch.random.get_rng_state()
    cuda_seeds = []  # torch.manual_seed would reseed every CUDA generator too (a GPU's dropout)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    o1 = TwoViewCrop(S, generator=torch.Generator().manual_seed(5))(img)
    assert cuda_seeds == []
    o2 = TwoViewCrop(S, generator=torch.Generator().manual_seed(5))(img)
    o3 = TwoViewCrop(S, generator=torch.Generator().manual_seed(6))(img)
    assert torch.equal(torch.random.get_rng_state(), state)  # a generator leaves the global RNG alone
    for x, y in zip(o1, o2):
        assert torch.equal(x, y)
    assert not torch.equal(o1.box_a, o3.box_a)
    # Without a generator the boxes are torchvision's own draws from the global RNG.
    torch.manual_seed(3)
    o4 = TwoViewCrop(S, scale=(0.2, 0.9))(img)
    torch.manual_seed(3)
    box = RandomResizedCrop.get_params(img, [0.2, 0.9], [3 / 4, 4 / 3])
    assert o4.box_a.tolist() == [float(v) for v in box]
    # hflip_p at its ends.
    g = torch.Generator().manual_seed(0)
    assert not any(bool(TwoViewCrop(S, hflip_p=0.0, generator=g)(img).flip_a) for _ in range(5))
    assert all(bool(TwoViewCrop(S, hflip_p=1.0, generator=g)(img).flip_b) for _ in range(5))


def test_two_view_crop_pickles_with_its_generator():
    """DataLoader workers receive the transform pickled; the generator state travels with it."""
    img = photo("chelsea")
    crop = TwoViewCrop(S, generator=torch.Generator().manual_seed(7))
    crop(img)  # advance the generator
    copy = pickle.loads(pickle.dumps(crop))
    for x, y in zip(crop(img), copy(img)):
        assert torch.equal(x, y)


def test_imports_without_torchvision():
    """torchvision is optional: crop_centers works without it, TwoViewCrop says what is missing."""
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "import torch\n"
        "from effssl_kernels.transforms import TwoViewCrop, crop_centers\n"
        "c, f = crop_centers(torch.zeros(1, 4) + 8, torch.zeros(1, 4) + 8, torch.zeros(1, dtype=torch.bool),"
        " torch.zeros(1, dtype=torch.bool), 16, 4)\n"
        "assert c.shape == (1, 4, 4, 2)\n"
        "try:\n    TwoViewCrop(16)\nexcept ImportError as e:\n    assert 'needs torchvision' in str(e)\n"
        "else:\n    raise SystemExit('no ImportError')\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_two_view_crop_pil_batch_and_collate():
    from PIL import Image

    arr = skdata.coffee()
    pil_out = TwoViewCrop((48, S), generator=torch.Generator().manual_seed(1))(Image.fromarray(arr))
    ten_out = TwoViewCrop((48, S), generator=torch.Generator().manual_seed(1))(photo("coffee"))
    assert pil_out.view_a.dtype == torch.float32 and type(pil_out.view_a) is torch.Tensor
    assert pil_out.view_a.shape == (3, 48, S)
    for x, y in zip(pil_out, ten_out):
        assert torch.allclose(x, y)

    # A batch [N, C, H, W]: each image its own draws, in the order single calls make them.
    src = _sources()
    batched = TwoViewCrop(S, generator=torch.Generator().manual_seed(2))(src)
    single = TwoViewCrop(S, generator=torch.Generator().manual_seed(2))
    collated = torch.utils.data.default_collate([single(x) for x in src])
    assert isinstance(collated, TwoViews)
    assert batched.view_a.shape == (3, 3, S, S) and batched.box_a.shape == (3, 4)
    assert batched.flip_a.shape == (3,) and batched.flip_a.dtype == torch.bool
    for x, y in zip(batched, collated):
        assert x.dtype == y.dtype and torch.equal(x, y)

    u8 = TwoViewCrop(S, generator=torch.Generator().manual_seed(0))((photo("chelsea") * 255).to(torch.uint8))
    assert u8.view_a.dtype == torch.uint8


def test_two_view_crop_feeds_block_match():
    """crop_centers of TwoViewCrop's record finds the scene point again on real photos."""
    src = _sources().repeat(4, 1, 1, 1)  # N = 12
    # Modest scale spread between the two views, so an exact-size template still matches.
    crop = TwoViewCrop(S, scale=(0.3, 0.5), generator=torch.Generator().manual_seed(4))
    v = crop(src)
    centers, flip = crop_centers(v.box_a, v.box_b, v.flip_a, v.flip_b, S, B)
    assert centers.device == v.box_a.device
    psnr, offset = block_match(v.view_a, v.view_b, B, R, centers=centers, flip=flip)
    plain, _ = block_match(v.view_a, v.view_b, B, R)
    cy, cx = centers[..., 0], centers[..., 1]
    interior = (cy >= 0) & (cy <= S - B) & (cx >= 0) & (cx <= S - B)
    assert interior.sum() >= 200, interior.sum()
    p = psnr[interior]
    assert p.median() >= 25.0, p.median()
    assert (p > 20.0).float().mean() >= 0.8
    assert (p > plain[interior]).float().mean() >= 0.9
    # Both masks: B's blocks in A with the arguments swapped.
    centers_b, flip_b = crop_centers(v.box_b, v.box_a, v.flip_b, v.flip_a, S, B)
    psnr_b, _ = block_match(v.view_b, v.view_a, B, R, centers=centers_b, flip=flip_b)
    interior_b = (centers_b >= 0).all(-1) & (centers_b <= S - B).all(-1)
    assert psnr_b[interior_b].median() >= 25.0


def test_crop_centers_meta_and_dtypes():
    """Runs on meta tensors, so it has no host sync (.item(), bool(), nonzero need data)."""
    ba = torch.zeros(5, 4, device="meta")
    fl = torch.zeros(5, dtype=torch.bool, device="meta")
    centers, flip = crop_centers(ba, ba, fl, fl, (40, 72), 16)
    assert centers.device.type == "meta" and centers.shape == (5, 2, 4, 2) and centers.dtype == torch.int64
    assert flip.device.type == "meta" and flip.shape == (5,)
    # int and float boxes of the same values agree; N = 0 works.
    g = torch.Generator().manual_seed(0)
    bi = torch.randint(0, 50, (7, 4), generator=g, dtype=torch.int32) + torch.tensor([0, 0, 30, 30], dtype=torch.int32)
    bj = torch.randint(0, 50, (7, 4), generator=g, dtype=torch.int32) + torch.tensor([0, 0, 30, 30], dtype=torch.int32)
    fa = torch.rand(7, generator=g) < 0.5
    fb = torch.rand(7, generator=g) < 0.5
    c_int, _ = crop_centers(bi, bj, fa, fb, 32, 4)
    c_flt, _ = crop_centers(bi.double(), bj.float(), fa, fb, 32, 4)
    assert torch.equal(c_int, c_flt)
    c0, f0 = crop_centers(torch.zeros(0, 4), torch.zeros(0, 4), fa[:0], fb[:0], 32, 4)
    assert c0.shape == (0, 8, 8, 2) and f0.shape == (0,)
    # A degenerate box sends the centre far outside instead of an undefined int cast.
    cd, _ = crop_centers(torch.tensor([[0.0, 0, 32, 32]]), torch.tensor([[0.0, 0, 0, 0]]), fa[:1], fb[:1], 32, 4)
    assert (cd.abs() >= 1 << 29).all()


@requires_gpu
def test_crop_centers_cuda_no_sync():
    ba = torch.tensor([[3.0, 4, 50, 60]] * 3, device="cuda")
    bb = torch.tensor([[10.0, 0, 70, 40]] * 3, device="cuda")
    fa = torch.tensor([True, False, True], device="cuda")
    fb = torch.tensor([False, False, True], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        centers, flip = crop_centers(ba, bb, fa, fb, (64, 64), 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    c_cpu, f_cpu = crop_centers(ba.cpu(), bb.cpu(), fa.cpu(), fb.cpu(), (64, 64), 8)
    assert centers.is_cuda and flip.is_cuda
    assert torch.equal(centers.cpu(), c_cpu) and torch.equal(flip.cpu(), f_cpu)


def _good():
    return dict(
        boxes_a=torch.tensor([[0, 0, 64, 64], [1, 2, 30, 40]]),
        boxes_b=torch.tensor([[5.0, 5, 60, 60], [0, 0, 50, 50]]),
        flips_a=torch.tensor([False, True]),
        flips_b=torch.tensor([True, True]),
        view_size=(64, 64),
        block_size=8,
    )


def test_crop_centers_takes_numpy_and_tensor_ints():
    # block_match takes a NumPy block size; crop_centers refused one ("must be an int")
    want = crop_centers(**_good())
    for b in (np.int64(8), np.int32(8), torch.tensor(8)):
        got = crop_centers(**{**_good(), "block_size": b})
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    for size in (np.int64(64), (np.int64(64), 64), np.array([64, 64])):  # view_size too
        got = crop_centers(**{**_good(), "view_size": size})
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(boxes_a=torch.zeros(2, 3)), ValueError, r"boxes_a must have shape \[N, 4\]"),
        (dict(boxes_b=torch.zeros(2, 4, 1)), ValueError, r"boxes_b must have shape \[N, 4\]"),
        (dict(boxes_a=torch.zeros(4)), ValueError, r"boxes_a must have shape \[N, 4\]"),
        (dict(boxes_b=torch.zeros(3, 4)), ValueError, "same N"),
        (dict(flips_a=torch.tensor([True])), ValueError, r"flips_a must have shape \[N\]"),
        (dict(flips_b=torch.zeros(2, 1, dtype=torch.bool)), ValueError, r"flips_b must have shape \[N\]"),
        (dict(flips_a=torch.tensor([0, 1])), TypeError, "flips_a must be a bool tensor"),
        (dict(boxes_a=torch.zeros(2, 4, dtype=torch.bool)), TypeError, "float or int tensor"),
        (dict(boxes_a=[[0, 0, 64, 64], [1, 2, 30, 40]]), TypeError, "boxes_a must be a tensor"),
        (dict(boxes_b=torch.zeros(2, 4, device="meta")), ValueError, "must be on cpu"),
        (dict(block_size=0), ValueError, "crop_centers: block_size must be at least 1"),
        (dict(block_size=-8), ValueError, "crop_centers: block_size must be at least 1"),
        (dict(block_size=8.0), TypeError, "block_size must be an int"),
        (dict(block_size=65), ValueError, "larger than the view"),
        (dict(view_size=(64, 7)), ValueError, "larger than the view"),
        (dict(view_size=(0, 64)), ValueError, "view_size must be positive"),
        (dict(view_size=(64, 64, 3)), TypeError, "pair of ints"),
    ],
)
def test_crop_centers_bad_input(change, exc, match):
    kw = _good()
    crop_centers(**kw)  # the unchanged arguments are fine
    kw.update(change)
    with pytest.raises(exc, match=match):
        crop_centers(**kw)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(size=0), ValueError, "size must be positive"),
        (dict(size=(64,)), TypeError, "pair of ints"),
        (dict(size=(64, 0)), ValueError, "size must be positive"),  # either side checked
        (dict(size=(64, -1)), ValueError, "size must be positive"),
        # a one-element tensor is not the int 64 (its __index__ would make it one; NumPy refuses)
        (dict(size=torch.tensor([64])), TypeError, "pair of ints"),
        (dict(size=64, scale=(0.9, 0.1)), ValueError, "scale"),
        (dict(size=64, ratio=(0.0, 1.0)), ValueError, "ratio"),
        (dict(size=64, hflip_p=1.5), ValueError, "hflip_p"),
        (dict(size=64, scale=(0.5, float("inf"))), ValueError, "scale"),
        (dict(size=64, ratio=(1.0, float("inf"))), ValueError, "ratio"),
        (dict(size=64, scale=0.5), ValueError, "scale"),
        (dict(size=64, generator=0), TypeError, "generator"),
    ],
)
def test_two_view_crop_bad_args(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TwoViewCrop(**kwargs)


def test_two_view_crop_bad_input():
    crop = TwoViewCrop(S)
    with pytest.raises(ValueError, match=r"\[C, H, W\] or \[N, C, H, W\]"):
        crop(torch.zeros(32, 32))
    with pytest.raises(TypeError, match="tensor or a PIL image"):
        crop(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        crop(torch.zeros(0, 3, 32, 32))
    with pytest.raises(ValueError, match=r"image is empty \(0x8 pixels\)"):
        crop(torch.rand(3, 0, 8))


def test_two_view_crop_pil_modes():
    """PIL images become float32 in [0, 1] (block_match's data_range=1): palettes are expanded
    (their indices were blended as intensities), modes without a fixed scale raise (16-bit data in
    mode "I" came out divided by 2^31 - 1, so noise read as ~100 dB "similar"; "F" unscaled)."""
    from PIL import Image

    rgb = Image.fromarray(skdata.coffee()[:96, :96])
    pal = rgb.convert("P")
    got = TwoViewCrop(S, generator=torch.Generator().manual_seed(4))(pal)
    want = TwoViewCrop(S, generator=torch.Generator().manual_seed(4))(pal.convert("RGB"))
    assert got.view_a.shape == (3, S, S)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    pal.info["transparency"] = 0
    assert TwoViewCrop(S)(pal).view_a.shape == (4, S, S)
    for mode in ("I", "F", "CMYK", "YCbCr"):
        with pytest.raises(ValueError, match=f"mode '{mode}' has no fixed"):
            TwoViewCrop(S)(rgb.convert(mode))
    for mode in ("1", "L", "LA", "RGBA"):
        v = TwoViewCrop(S)(rgb.convert(mode)).view_a
        assert v.dtype == torch.float32 and -1e-5 <= v.min() and v.max() <= 1 + 1e-5  # antialias rounding
    v16 = TwoViewCrop(S)(Image.fromarray((skdata.camera()[:96, :96].astype(np.uint16) * 257))).view_a
    assert v16.max() > 0.5  # I;16 scales by 65535


def test_crop_centers_non_square_view():
    # every other crop_centers test of a rescaled or shifted box uses a square view: H and W
    # swapped in the column maps (exact int64 path and float path) went unnoticed
    H, W, B = 48, 80, 8
    g = torch.Generator().manual_seed(0)
    N = 40
    ba = torch.cat([torch.randint(0, 100, (N, 2), generator=g), torch.randint(20, 150, (N, 2), generator=g)], -1)
    bb = torch.cat([torch.randint(0, 100, (N, 2), generator=g), torch.randint(20, 150, (N, 2), generator=g)], -1)
    frac = torch.arange(N) % 2 == 1  # odd samples: fractional boxes, the float path
    ba = torch.where(frac[:, None], ba + torch.rand(N, 4, generator=g, dtype=torch.float64), ba.double())
    fa = torch.rand(N, generator=g) < 0.5
    fb = torch.rand(N, generator=g) < 0.5
    c, _ = crop_centers(ba, bb, fa, fb, (H, W), B)
    assert c.shape == (N, H // B, W // B, 2)
    for n in range(N):
        rows, cols = _exact_centers(ba[n].tolist(), bb[n].tolist(), bool(fa[n]), (H, W), B)
        assert c[n, :, 0, 0].tolist() == rows and c[n, 0, :, 1].tolist() == cols, n
