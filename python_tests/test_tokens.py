"""random_token_keep and similar_token_keep (SEMANTICS.md section 3): which patch tokens a ViT keeps."""
import math

import pytest
import torch

import effssl_kernels as ek
from effssl_kernels.reference import block_match_reference
from effssl_kernels.tokens import keep_topped_up, round_keep_count


def _check_rows(keep: torch.Tensor, L: int) -> None:
    assert keep.dtype == torch.int64
    assert ((keep >= 0) & (keep < L)).all()
    assert torch.equal(keep, keep.sort(dim=1).values), "rows must be sorted ascending"
    if keep.shape[1] > 1:
        assert (keep[:, 1:] != keep[:, :-1]).all(), "duplicates in a row"


# ----------------------------------------------------------------------------- random_token_keep
@pytest.mark.parametrize(
    "L,ratio,multiple_of,K",
    [
        (196, 1.0, 8, 196),
        (196, 0.75, 8, 152),  # int(147) -> 152
        (196, 0.5, 8, 104),  # 98 -> 104
        (196, 0.25, 8, 56),  # 49 -> 56
        (196, 0.99, 8, 196),  # 194 -> 200, capped at L
        (196, 0.5, 1, 98),  # timm's count exactly
        (196, 0.001, 1, 1),  # max(1, 0)
        (196, 0.001, 8, 8),
        (7, 0.5, 8, 7),
        (1, 0.3, 8, 1),
        (225, 0.3, 16, 80),  # int(67.5) = 67 -> 80
        (10, 0.75, 1, 7),  # int(7.5) = 7 as timm, not round's 8
        (196, 0.3, 1, 58),  # int(58.8) = 58
    ],
)
def test_random_keep_count(L, ratio, multiple_of, K):
    keep = ek.random_token_keep(5, L, ratio, multiple_of=multiple_of)
    assert keep.shape == (5, K)
    assert K == min(L, math.ceil(max(1, int(L * ratio)) / multiple_of) * multiple_of)
    _check_rows(keep, L)


def test_random_keep_uniform():
    """Every token is kept with probability K/L, independently of its position, and rows differ."""
    N, L = 6000, 16
    keep = ek.random_token_keep(N, L, 0.25, multiple_of=1, generator=torch.Generator().manual_seed(1))
    assert keep.shape == (N, 4)
    _check_rows(keep, L)
    freq = torch.bincount(keep.flatten(), minlength=L).double() / N
    # binomial std of one frequency: sqrt(p(1-p)/N) ~ 0.0056; 5 sigma
    assert (freq - 0.25).abs().max() < 0.028, freq
    # every pair of tokens is kept together with probability K(K-1) / (L(L-1)) = 0.05, as for a
    # uniform subset (std 0.0028 per pair; 5 sigma)
    onehot = torch.zeros(N, L, dtype=torch.float64).scatter_(1, keep, 1.0)
    pair = (onehot.T @ onehot) / N
    off = pair[~torch.eye(L, dtype=torch.bool)]
    assert (off - 0.05).abs().max() < 0.015, off
    assert torch.unique(keep, dim=0).shape[0] > 1500  # C(16, 4) = 1820 subsets, 6000 draws


def test_random_keep_generator():
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (7, 7, 8))
    a = ek.random_token_keep(8, 50, 0.5, generator=g1)
    b = ek.random_token_keep(8, 50, 0.5, generator=g2)
    c = ek.random_token_keep(8, 50, 0.5, generator=g3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, ek.random_token_keep(8, 50, 0.5, generator=g1))  # state advanced


def test_random_keep_empty_batch_and_device():
    keep = ek.random_token_keep(0, 10, 0.5, device="cpu")
    assert keep.shape == (0, 8) and keep.device.type == "cpu"


@pytest.mark.parametrize(
    "args,kw,exc",
    [
        ((4, 0, 0.5), {}, ValueError),
        ((-1, 10, 0.5), {}, ValueError),
        ((4, 10, 0.0), {}, ValueError),
        ((4, 10, 1.5), {}, ValueError),
        ((4, 10, float("nan")), {}, ValueError),
        ((4, 10, -0.1), {}, ValueError),
        ((4, 10, 0.5), {"multiple_of": 0}, ValueError),
        ((4.0, 10, 0.5), {}, TypeError),
        ((4, 10, "0.5"), {}, TypeError),
        ((4, True, 0.5), {}, TypeError),
        ((4, 10, 0.5), {"generator": 3}, TypeError),
        ((4, 10, 0.5), {"generator": torch.Generator(), "device": "meta"}, ValueError),
    ],
)
def test_random_keep_errors(args, kw, exc):
    with pytest.raises(exc):
        ek.random_token_keep(*args, **kw)


# ----------------------------------------------------------------------------- similar_token_keep
def _expected_keep(psnr_a, psnr_b, threshold, multiple_of):
    """Brute force, one sample at a time: all non-similar tokens, then the lowest-psnr ones."""
    rows = []
    for psnr in (psnr_a, psnr_b):
        for row in psnr.reshape(psnr.shape[0], -1).tolist():
            dissimilar = [i for i, v in enumerate(row) if not (v > threshold)]
            similar = sorted((v, i) for i, v in enumerate(row) if v > threshold)
            rows.append((dissimilar, [i for _, i in similar]))
    L = psnr_a[0].numel()
    c = max(len(d) for d, _ in rows)
    K = min(L, math.ceil(max(1, c) / multiple_of) * multiple_of)
    keep = [sorted(d + s[: K - len(d)]) for d, s in rows]
    n = psnr_a.shape[0]
    return torch.tensor(keep[:n]).reshape(n, K), torch.tensor(keep[n:]).reshape(n, K)


def _planted(N=3, p=4, grid=(6, 8), changed=((1, 5, 9), (0,), (2, 3, 4, 11, 17, 30, 40, 47, 20, 21, 22))):
    """view_b = view_a plus small graded noise (all > 20 dB, distinct PSNRs) except the listed
    patches, which are redrawn (far below 20 dB)."""
    g = torch.Generator().manual_seed(3)
    H, W = grid[0] * p, grid[1] * p
    a = torch.rand(N, 3, H, W, generator=g)
    L = grid[0] * grid[1]
    amp = (torch.randperm(N * L, generator=g).reshape(N, 1, grid[0], 1, grid[1], 1).float() + 1) * (0.02 / (N * L))
    noise = (torch.rand(N, 3, grid[0], p, grid[1], p, generator=g) - 0.5) * amp
    b = (a + noise.reshape(N, 3, H, W)).clamp(0, 1)
    for n, idx in enumerate(changed):
        for t in idx:
            i, j = divmod(t, grid[1])
            b[n, :, i * p : (i + 1) * p, j * p : (j + 1) * p] = torch.rand(3, p, p, generator=g)
    return a, b, p


@pytest.mark.parametrize("multiple_of", [1, 8, 16])
def test_similar_keep_planted(multiple_of):
    a, b, p = _planted()
    keep_a, keep_b = ek.similar_token_keep(a, b, p, multiple_of=multiple_of)
    psnr_a, _ = block_match_reference(a, b, p, 0)
    psnr_b, _ = block_match_reference(b, a, p, 0)
    exp_a, exp_b = _expected_keep(psnr_a, psnr_b, 20.0, multiple_of)
    assert torch.equal(keep_a, exp_a) and torch.equal(keep_b, exp_b)
    # the planted patches are exactly the dissimilar ones, and every one of them is kept
    assert (psnr_a.flatten(1) <= 20).sum(1).tolist() == [3, 1, 11]
    for n, idx in enumerate(((1, 5, 9), (0,), (2, 3, 4, 11, 17, 30, 40, 47, 20, 21, 22))):
        assert set(idx) <= set(keep_a[n].tolist())
    assert keep_a.shape[1] == min(48, math.ceil(11 / multiple_of) * multiple_of)
    _check_rows(keep_a, 48)


def test_similar_keep_all_similar_and_none_similar():
    a = torch.rand(2, 3, 16, 16)
    ka, kb = ek.similar_token_keep(a, a.clone(), 4)  # identical: psnr +inf everywhere
    assert ka.shape == (2, 8) and torch.equal(ka, kb)
    assert torch.equal(ka, torch.arange(8).expand(2, 8))  # all ties at +inf: lowest indices
    ka, kb = ek.similar_token_keep(a, 1 - a, 4)  # nothing similar: K = L, everything kept
    assert torch.equal(ka, torch.arange(16).expand(2, 16)) and torch.equal(kb, ka)


def test_similar_keep_nan_never_similar():
    a = torch.rand(1, 3, 16, 16)
    b = a.clone()
    b[0, 0, 5, 5] = float("nan")  # patch (1, 1) = token 5
    ka, _ = ek.similar_token_keep(a, b, 4, multiple_of=1)
    assert ka.tolist() == [[5]]


def test_similar_keep_threshold():
    a, b, p = _planted()
    k_lo, _ = ek.similar_token_keep(a, b, p, threshold_db=0.0, multiple_of=1)  # nearly all similar
    k_hi, _ = ek.similar_token_keep(a, b, p, threshold_db=200.0, multiple_of=1)  # none similar
    assert k_lo.shape[1] < 11 and k_hi.shape[1] == 48


def _two_crops(top_b: int, left_b: int, size: int = 64):
    """Two unscaled crops of a photo, the second shifted, in [0, 1]."""
    import skimage.data

    img = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 255
    a = img[:, 100 : 100 + size, 150 : 150 + size]
    b = img[:, top_b : top_b + size, left_b : left_b + size]
    boxes_a = torch.tensor([[100, 150, size, size]])
    boxes_b = torch.tensor([[top_b, left_b, size, size]])
    return a[None].contiguous(), b[None].contiguous(), boxes_a, boxes_b


def test_similar_keep_photo_with_centers():
    """Crops shifted by whole patches: with centres from the crop boxes, exactly the patches of the
    overlap are similar (identical pixels); at the same place (no centres) almost none are."""
    p = 8
    a, b, boxes_a, boxes_b = _two_crops(116, 174)  # B is A moved by 2 patches down, 3 right
    no_flip = torch.zeros(1, dtype=torch.bool)
    ca, flip = ek.crop_centers(boxes_a, boxes_b, no_flip, no_flip, 64, p)
    cb, _ = ek.crop_centers(boxes_b, boxes_a, no_flip, no_flip, 64, p)
    ka, kb = ek.similar_token_keep(a, b, p, multiple_of=1, centers=(ca, cb), flip=flip)
    grid = torch.arange(64).reshape(8, 8)
    # A's patches at rows >= 2, cols >= 3 are in B; B's patches at rows < 6, cols < 5 are in A
    out_a = sorted(set(range(64)) - set(grid[2:, 3:].flatten().tolist()))
    out_b = sorted(set(range(64)) - set(grid[:6, :5].flatten().tolist()))
    assert ka.shape[1] == max(len(out_a), len(out_b)) == 34
    assert set(out_a) <= set(ka[0].tolist()) and set(out_b) <= set(kb[0].tolist())
    # Without the centres the shifted photo is dissimilar nearly everywhere.
    k0, _ = ek.similar_token_keep(a, b, p, multiple_of=1)
    assert k0.shape[1] > 48
    # A search radius finds the 3-pixel shift without centres.
    a2, b2, _, _ = _two_crops(103, 150)
    k_r0, _ = ek.similar_token_keep(a2, b2, p, multiple_of=1)
    k_r3, _ = ek.similar_token_keep(a2, b2, p, multiple_of=1, search_radius=3)
    assert k_r3.shape[1] <= 8 < k_r0.shape[1]  # only the bottom row has no candidate at +3


def test_similar_keep_flip():
    """B is A mirrored: with flip set every patch matches exactly, in both directions."""
    a = torch.rand(2, 3, 16, 24)
    b = a.flip(-1)
    flip = torch.tensor([True, True])
    ka, kb = ek.similar_token_keep(a, b, 4, flip=flip, multiple_of=1)
    assert ka.shape == (2, 1) and kb.shape == (2, 1)
    k_noflip, _ = ek.similar_token_keep(a, b, 4, multiple_of=1)
    assert k_noflip.shape[1] == 24


def test_similar_keep_flip_radius0_searches_both_directions():
    """With flip the two directions differ (A's block i meets B's mirrored block, and back):
    the radius-0 shortcut of one search must not be taken (audit 80)."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g)
    b = a.flip(-1).clone()
    b[:, :, :, :8] = torch.rand(2, 3, 32, 8, generator=g)  # B's left column of blocks redrawn
    flip = torch.tensor([True, True])
    ka, kb = ek.similar_token_keep(a, b, 8, flip=flip, multiple_of=1)
    psnr_a, _ = block_match_reference(a, b, 8, 0, flip=flip)
    psnr_b, _ = block_match_reference(b, a, 8, 0, flip=flip)
    ea, eb = _expected_keep(psnr_a, psnr_b, 20.0, 1)
    assert torch.equal(ka, ea) and torch.equal(kb, eb)
    # A's right column meets B's redrawn left one: each view keeps its own column
    assert ka[0].tolist() == [3, 7, 11, 15] and kb[0].tolist() == [0, 4, 8, 12]


def test_similar_keep_radius0_matches_two_searches():
    """The shortcut (one search when r = 0 and no centres) equals searching both directions."""
    a, b, p = _planted()
    ka, kb = ek.similar_token_keep(a, b, p, multiple_of=1)
    psnr_a, _ = block_match_reference(a, b, p, 0)
    psnr_b, _ = block_match_reference(b, a, p, 0)
    torch.testing.assert_close(psnr_a, psnr_b)
    ea, eb = _expected_keep(psnr_a, psnr_b, 20.0, 1)
    assert torch.equal(ka, ea) and torch.equal(kb, eb)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_similar_keep_low_precision(dtype):
    a, b, p = _planted()
    ka, kb = ek.similar_token_keep(a.to(dtype), b.to(dtype), p, multiple_of=1)
    for n, idx in enumerate(((1, 5, 9), (0,), (2, 3, 4, 11, 17, 30, 40, 47, 20, 21, 22))):
        assert set(idx) <= set(ka[n].tolist()) and set(idx) <= set(kb[n].tolist())
    assert ka.shape[1] == 11


_CENTERS = torch.zeros(1, 4, 4, 2, dtype=torch.long)


@pytest.mark.parametrize(
    "args,kw,exc",
    [
        ((torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), 5), {}, ValueError),  # 5 does not divide 16
        ((torch.rand(1, 3, 16, 12), torch.rand(1, 3, 16, 12), 8), {}, ValueError),
        ((torch.rand(1, 3, 16, 16), torch.rand(1, 3, 8, 8), 4), {}, ValueError),
        ((torch.rand(3, 16, 16), torch.rand(3, 16, 16), 4), {}, ValueError),
        ((torch.rand(1, 3, 16, 16), None, 4), {}, TypeError),
        ((torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), 0), {}, ValueError),
        ((torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), 4.0), {}, TypeError),
        ((torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), 4), {"multiple_of": 0}, ValueError),
        ((torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), 4), {"threshold_db": float("nan")}, ValueError),
        ((torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), 4), {"threshold_db": "20"}, TypeError),
        ((torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), 4), {"centers": _CENTERS}, TypeError),  # not a pair
        ((torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), 4), {"centers": (_CENTERS[:, :3],) * 2}, ValueError),
        ((torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), 4), {"search_radius": -1}, ValueError),
        ((torch.rand(1, 3, 16, 16).double(), torch.rand(1, 3, 16, 16).double(), 4), {}, TypeError),
    ],
)
def test_similar_keep_errors(args, kw, exc):
    with pytest.raises(exc):
        ek.similar_token_keep(*args, **kw)


def test_similar_keep_one_sync(monkeypatch):
    """Only K is read back to the host: count Tensor.__int__/item/tolist calls."""
    a, b, p = _planted()
    calls = []
    for name in ("__int__", "item", "tolist", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *args, _orig=orig, _name=name):
            calls.append(_name)
            return _orig(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    ek.similar_token_keep(a, b, p, search_radius=1)
    monkeypatch.undo()
    assert len(calls) == 1, calls


PSNR = torch.tensor([[[30.0, 10.0], [10.0, 30.0]]])


@pytest.mark.parametrize(
    "args,kw,exc,match",
    [
        ((PSNR, PSNR, 20.0), {"multiple_of": 0}, ValueError, "multiple_of must be at least 1"),
        ((PSNR, PSNR, 20.0), {"multiple_of": -8}, ValueError, "multiple_of must be at least 1"),
        ((PSNR, PSNR, 20.0), {"multiple_of": 2.0}, TypeError, "multiple_of must be an int"),
        ((PSNR, PSNR, 20.0), {"multiple_of": True}, TypeError, "multiple_of must be an int"),
        ((PSNR, PSNR, float("nan")), {}, ValueError, "threshold_db must not be NaN"),
        ((PSNR, PSNR, "20"), {}, TypeError, "threshold_db"),
        ((PSNR, PSNR[:, :1], 20.0), {}, ValueError, "one shape"),
        ((PSNR[0], PSNR[0], 20.0), {}, ValueError, r"\[N, Hb, Wb\]"),
        ((PSNR, PSNR.long(), 20.0), {}, TypeError, "floating point"),
        ((PSNR, PSNR.tolist(), 20.0), {}, TypeError, "tensors"),
        ((PSNR[:, :0], PSNR[:, :0], 20.0), {}, ValueError, "no block"),
        ((PSNR[:, :, :0], PSNR[:, :, :0], 20.0), {}, ValueError, "no block"),
    ],
)
def test_tokens_from_psnr_errors(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        ek.tokens_from_psnr(*args, **kw)


def test_tokens_from_psnr_valid():
    ka, kb = ek.tokens_from_psnr(PSNR, PSNR, 20.0, multiple_of=1)
    assert ka.tolist() == [[1, 2]] and kb.tolist() == [[1, 2]]
    # one K for both views: the larger kept count, here view B's (A keeps 1 of 4, B 3)
    ka, kb = ek.tokens_from_psnr(PSNR.clamp(min=25.0).index_put_((torch.tensor([0]),) * 3, torch.tensor(5.0)),
                                 PSNR.clone().index_put_((torch.tensor([0]),) * 3, torch.tensor(5.0)), 20.0,
                                 multiple_of=1)
    assert kb.tolist() == [[0, 1, 2]] and ka.shape == (1, 3) and ka[0, 0] == 0


@pytest.mark.parametrize("args,exc", [((5, 16, 0), ValueError), ((5, 16, -8), ValueError), ((5, 16, 2.5), TypeError),
                                      ((5, 0, 8), ValueError), ((5, 16, True), TypeError)])
def test_round_keep_count_errors(args, exc):
    with pytest.raises(exc):
        round_keep_count(*args)


def test_round_keep_count():
    assert [round_keep_count(c, 16, 8) for c in (0, 1, 8, 9, 20)] == [8, 8, 8, 16, 16]
    assert round_keep_count(3, 16, 1) == 3


# ----------------------------------------------------------------------------- keep_buckets
def _planted_kept(gen):
    """12 samples of 20 tokens with kept counts 1..20 spread out, and random PSNRs."""
    counts = torch.tensor([20, 1, 3, 17, 5, 8, 8, 2, 12, 19, 6, 4])
    kept = torch.rand(12, 20, generator=gen).argsort(1) < counts[:, None]
    psnr = torch.rand(12, 20, generator=gen) * 40
    psnr[0, 3] = float("nan")
    return kept, psnr


@pytest.mark.parametrize("buckets", [1, 2, 3, 5, 12, 40])
def test_keep_buckets_groups_by_count(buckets):
    kept, psnr = _planted_kept(torch.Generator().manual_seed(0))
    groups = ek.keep_buckets(kept, psnr, buckets)
    assert 1 <= len(groups) <= min(buckets, 12)
    rows = torch.cat([r for r, _ in groups])
    assert torch.equal(rows.sort().values, torch.arange(12)), "every sample in exactly one group"
    ks = [k.shape[1] for _, k in groups]
    assert ks == sorted(set(ks)), "neighbours with the same K are merged"
    counts = kept.sum(1)
    assert (counts[rows].diff() >= 0).all(), "groups follow the kept count"
    for r, keep in groups:
        _check_rows(keep, 20)
        assert keep.shape == (len(r), round_keep_count(int(counts[r].max()), 20))
        for i, row in enumerate(r.tolist()):
            mine = torch.zeros(20, dtype=torch.bool)
            mine[keep[i]] = True
            assert mine[kept[row]].all(), "a kept token was dropped"
            # the fill-up: the lowest-PSNR removed tokens (NaN last), as the one-K path chooses
            extra = (~kept[row]).nonzero()[:, 0]
            key = psnr[row, extra].nan_to_num(nan=float("inf"))
            want = extra[key.argsort(stable=True)[: keep.shape[1] - int(kept[row].sum())]]
            assert torch.equal(mine.nonzero()[:, 0], torch.cat([kept[row].nonzero()[:, 0], want]).sort().values)


def test_fill_up_takes_nan_psnr_last():
    # One kept token of 10, K = 8: seven of the nine removed ones fill up, by PSNR, NaN last
    # (a NaN PSNR is a block without a trustworthy match: the least evidence of redundancy).
    kept = torch.zeros(1, 10, dtype=torch.bool)
    kept[0, 9] = True
    psnr = torch.tensor([[float("nan"), 5.0, float("nan"), 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 0.0]])
    want = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9]])  # 8 finite removed tokens + the kept one: NaNs out
    (rows, keep), = ek.keep_buckets(kept, psnr, 1)
    assert torch.equal(keep, want)
    ka, kb, K = keep_topped_up(kept.view(1, 2, 5), kept.view(1, 2, 5), psnr.view(1, 2, 5), psnr.view(1, 2, 5))
    assert K == 8 and torch.equal(ka, want) and torch.equal(kb, want)
    psnr[0, 8] = float("nan")  # only 7 finite removed tokens: one NaN fills, the lower index first
    (rows, keep), = ek.keep_buckets(kept, psnr, 1)
    assert torch.equal(keep, torch.tensor([[0, 1, 3, 4, 5, 6, 7, 9]]))


def test_keep_buckets_saves_tokens_over_one_k():
    kept, psnr = _planted_kept(torch.Generator().manual_seed(1))
    one = ek.keep_buckets(kept, psnr, 1)
    assert one[0][1].shape[1] == 20  # the sample that keeps all 20 sets the batch's K
    four = ek.keep_buckets(kept, psnr, 4)
    # counts sorted 1 2 3 | 4 5 6 | 8 8 12 | 17 19 20 -> K = 8, 8, 16, 20: the two 8s merge
    assert [k.shape[1] for _, k in four] == [8, 16, 20] and [len(r) for r, _ in four] == [6, 3, 3]
    # grids [M, Hb, Wb] are flattened like the masks
    g = ek.keep_buckets(kept.view(12, 4, 5), psnr.view(12, 4, 5), 4)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(g, four))


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 4), 0), ValueError, "buckets must be at least 1"),
        ((torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 4), 2.0), TypeError, "buckets must be an int"),
        ((torch.ones(2, 4), torch.zeros(2, 4), 2), TypeError, "kept must be bool"),
        ((torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 4), 2, 0), ValueError, "keep_buckets: multiple_of must be"),
        ((torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.long), 2), TypeError, "psnr floating"),
        ((torch.ones(2, 4, dtype=torch.bool).tolist(), torch.zeros(2, 4), 2), TypeError, "must be tensors"),
        ((torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 5), 2), ValueError, "same shape"),
        ((torch.ones(4, dtype=torch.bool), torch.zeros(4), 2), ValueError, r"\[M, L\]"),
        ((torch.ones(0, 4, dtype=torch.bool), torch.zeros(0, 4), 2), ValueError, "empty"),
    ],
)
def test_keep_buckets_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        ek.keep_buckets(*args)


def test_numpy_numbers_are_accepted():
    # np.float32 keep ratios (from a config array) were refused with a TypeError; NumPy ints for
    # resize_pos_embed's num_prefix_tokens too (until 2026-12-06; other size arguments took them)
    np = pytest.importorskip("numpy")
    assert ek.random_token_keep(2, 16, np.float32(0.5)).shape == (2, 8)
    pe = torch.randn(1, 1 + 16, 8)
    torch.testing.assert_close(ek.resize_pos_embed(pe, 4, 2, num_prefix_tokens=np.int64(1)),
                               ek.resize_pos_embed(pe, 4, 2, num_prefix_tokens=1))
    with pytest.raises(TypeError, match="num_prefix_tokens must be an int"):
        ek.resize_pos_embed(pe, 4, 2, num_prefix_tokens=1.0)


def test_similar_keep_radius_searches_each_direction():
    # B is A moved up by one patch: with a radius each view keeps only its own strip without a
    # counterpart (A's top row, B's bottom row); the search is not symmetric, so B needs its own
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 40, 32, generator=g)
    a, b = img[:, :, :32].contiguous(), img[:, :, 8:40].contiguous()
    ka, kb = ek.similar_token_keep(a, b, 8, multiple_of=1, search_radius=8)
    assert ka.tolist() == [[0, 1, 2, 3]] and kb.tolist() == [[12, 13, 14, 15]]
