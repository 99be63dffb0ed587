"""BlockMask: validation and pixel_mask against independent brute-force oracles."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from effssl_kernels.masks import BlockMask


def random_keep(N, Hb, Wb, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, Hb, Wb, generator=g) < p


def brute_pixel_mask(keep, B, s, h, w):
    """Loop over every feature pixel and every point it covers (SEMANTICS section 2): a point
    outside the block grid (leftover pixels, or beyond the image) is kept."""
    N, Hb, Wb = keep.shape
    out = torch.zeros(N, 1, h, w, dtype=torch.bool)
    kl = keep.tolist()
    for n in range(N):
        for p in range(h):
            for q in range(w):
                kept = False
                for r in range(p * s, (p + 1) * s):
                    for c in range(q * s, (q + 1) * s):
                        if r >= Hb * B or c >= Wb * B or kl[n][r // B][c // B]:
                            kept = True
                            break
                    if kept:
                        break
                out[n, 0, p, q] = kept
    return out


def pooled_pixel_mask(keep, B, s, h, w):
    """Second, vectorised oracle: the input-pixel keep map (True off the grid and past the image),
    OR-pooled with an s x s window."""
    N, Hb, Wb = keep.shape
    Hx, Wx = max(Hb * B, h * s), max(Wb * B, w * s)
    full = torch.ones(N, 1, Hx, Wx)
    full[:, 0, : Hb * B, : Wb * B] = keep.float().repeat_interleave(B, 1).repeat_interleave(B, 2)
    return F.max_pool2d(full[..., : h * s, : w * s], s, s).bool()


# (B, H, W, stride, feature size): strides dividing B or not, images that B divides or not, maps
# cut short (no padding) and maps running past the image (extra padding / ceil_mode).
SMALL = [
    (4, 16, 16, 1, (16, 16)), (4, 16, 16, 2, (8, 8)), (4, 16, 16, 4, (4, 4)), (4, 16, 16, 8, (2, 2)),
    (4, 16, 16, 3, (6, 6)), (4, 13, 11, 2, (7, 6)), (4, 13, 11, 3, (5, 4)), (5, 17, 12, 2, (9, 6)),
    (5, 17, 12, 4, (5, 3)), (5, 20, 20, 3, (7, 7)), (6, 18, 20, 4, (5, 5)), (6, 18, 20, 8, (3, 3)),
    (6, 19, 13, 3, (7, 5)), (4, 16, 16, 2, (7, 5)), (4, 10, 9, 2, (7, 8)), (5, 12, 12, 4, (6, 2)),
]


@pytest.mark.parametrize("B,H,W,s,size", SMALL)
def test_pixel_mask_brute_force_small(B, H, W, s, size):
    N = 3
    keep = random_keep(N, H // B, W // B, seed=B * 1000 + H * 10 + s)
    m = BlockMask(keep, B, (H, W))
    got = m.pixel_mask(s, size)
    assert got.dtype == torch.bool and got.shape == (N, 1, *size)
    assert torch.equal(got, brute_pixel_mask(keep, B, s, *size))
    assert torch.equal(got, pooled_pixel_mask(keep, B, s, *size))


def test_pixel_mask_cache_tells_strides_apart():
    # one map size reached with strides (1, 2) and (1, 1): two masks, not one cached for both
    keep = random_keep(2, 4, 4, seed=5)
    m = BlockMask(keep, 4, 16)
    a = m.pixel_mask((1, 2), (16, 16))
    b = m.pixel_mask((1, 1), (16, 16))
    assert torch.equal(b, BlockMask(keep, 4, 16).pixel_mask(1, (16, 16)))
    assert torch.equal(b, brute_pixel_mask(keep, 4, 1, 16, 16)) and not torch.equal(a, b)
    for bad in ((4, -1), (-1, 4)):
        with pytest.raises(ValueError, match="size must be non-negative"):
            m.pixel_mask(1, bad)


def conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def resnet_sizes(H):
    """Feature sizes and cumulative strides of a ResNet stem and stages from real conv arithmetic."""
    out = [(1, H)]
    h = conv_out(H, 7, 2, 3)            # conv1 7x7/2 pad 3
    out.append((2, h))
    h = conv_out(h, 3, 2, 1)            # maxpool 3x3/2 pad 1
    out.append((4, h))
    for s in (8, 16, 32):               # 3x3/2 pad 1 (or 1x1/2) downsampling
        h = conv_out(h, 3, 2, 1)
        out.append((s, h))
    return out


@pytest.mark.parametrize("H,B", [(224, 32), (224, 30), (32, 4), (32, 5), (225, 32)])
def test_pixel_mask_resnet_pyramid(H, B):
    keep = random_keep(2, H // B, H // B, seed=H + B)
    m = BlockMask(keep, B, H)
    sizes = resnet_sizes(H)
    if H == 224:
        assert [h for _, h in sizes] == [224, 112, 56, 28, 14, 7]
    for s, h in sizes:
        got = m.pixel_mask(s, (h, h))
        assert torch.equal(got, pooled_pixel_mask(keep, B, s, h, h)), (s, h)
    # One brute-force check of a strided level per case keeps the loop oracle cheap.
    s, h = sizes[2]
    assert torch.equal(m.pixel_mask(s, (h, h)), brute_pixel_mask(keep, B, s, h, h))


@pytest.mark.parametrize("B", [4, 8, 32])
def test_waxing_removed_footprint(B):
    """A removed block removes exactly its footprint at every stride dividing B (never shrinks,
    never grows), whatever its neighbours are."""
    Hb, Wb = 3, 4
    keep = torch.ones(2, Hb, Wb, dtype=torch.bool)
    keep[0, 1, 2] = False
    keep[1, 0, 0] = False
    keep[1, 2, 3] = False
    m = BlockMask(keep, B, (Hb * B, Wb * B))
    s = 1
    while s <= B:
        f = B // s
        pm = m.pixel_mask(s, (Hb * f, Wb * f))[:, 0]
        expect = torch.ones_like(pm)
        for n, i, j in [(0, 1, 2), (1, 0, 0), (1, 2, 3)]:
            expect[n, i * f:(i + 1) * f, j * f:(j + 1) * f] = False
        assert torch.equal(pm, expect), s
        s *= 2


def test_pixel_spanning_blocks_kept_if_any_kept():
    """B = 4, stride 8: each feature pixel covers 2 x 2 blocks and is kept iff any is kept."""
    keep = torch.zeros(1, 4, 4, dtype=torch.bool)
    keep[0, 0, 1] = True            # one kept block in the top-left 2x2 group
    keep[0, 3, 3] = True            # one in the bottom-right group
    m = BlockMask(keep, 4, 16)
    pm = m.pixel_mask(8, (2, 2))[0, 0]
    assert pm.tolist() == [[True, False], [False, True]]
    # Stride 3 (not dividing B): pixel 1 covers input rows/cols 3..5, i.e. blocks 0 and 1.
    keep = torch.zeros(1, 2, 2, dtype=torch.bool)
    keep[0, 1, 1] = True
    pm = BlockMask(keep, 4, 8).pixel_mask(3, (3, 3))[0, 0]
    # Pixel 2 covers rows/cols 6..8; 8 lies past the 8-px image, outside the grid: kept.
    assert pm.tolist() == [[False, False, True], [False, True, True], [True, True, True]]
    assert BlockMask(keep, 4, 8).pixel_mask(3, (2, 2))[0, 0].tolist() == [[False, False], [False, True]]


@given(st.integers(1, 6), st.integers(4, 30), st.integers(4, 30), st.sampled_from([1, 2, 3, 4]),
       st.integers(0, 3), st.integers(0, 3))
@settings(max_examples=25, deadline=None, derandomize=True)
def test_or_pool_property(B, H, W, s, extra_h, extra_w):
    """pixel_mask(2s) is the 2x2 OR-pool of pixel_mask(s), on maps up to past the image."""
    keep = random_keep(2, H // B, W // B, seed=H * 31 + W)
    m = BlockMask(keep, B, (H, W))
    h2 = -(-H // (2 * s)) + extra_h
    w2 = -(-W // (2 * s)) + extra_w
    fine = m.pixel_mask(s, (2 * h2, 2 * w2)).float()
    assert torch.equal(m.pixel_mask(2 * s, (h2, w2)), F.max_pool2d(fine, 2, 2).bool())
    assert torch.equal(m.pixel_mask(s, (h2, w2)), pooled_pixel_mask(keep, B, s, h2, w2))


@pytest.mark.parametrize("B,H,W", [(4, 16, 16), (5, 17, 23), (32, 224, 224)])
def test_all_kept_and_all_removed(B, H, W):
    Hb, Wb = H // B, W // B
    ones = BlockMask(torch.ones(2, Hb, Wb, dtype=torch.bool), B, (H, W))
    zeros = BlockMask(torch.zeros(2, Hb, Wb, dtype=torch.bool), B, (H, W))
    for s in (1, 2, 3, 4, 8):
        h, w = -(-H // s), -(-W // s)
        assert bool(ones.pixel_mask(s, (h + 1, w + 2)).all())
        pm = zeros.pixel_mask(s, (h, w))[:, 0]
        # Removed exactly where the pixel lies wholly inside the grid.
        rows = (torch.arange(h) + 1) * s <= Hb * B
        cols = (torch.arange(w) + 1) * s <= Wb * B
        assert torch.equal(pm, ~(rows[:, None] & cols[None, :]).expand(2, h, w))
    assert ones.keep_ratio().item() == 1.0 and zeros.keep_ratio().item() == 0.0


def test_edge_cells_and_beyond_image_kept():
    """Partial edge blocks are no grid cells (kept); feature pixels beyond the image are kept."""
    keep = torch.zeros(1, 2, 2, dtype=torch.bool)
    m = BlockMask(keep, 4, (11, 9))         # grid 2 x 2 covers rows < 8 and columns < 8
    pm = m.pixel_mask(1, (11, 9))[0, 0]
    assert not pm[:8, :8].any() and pm[8:, :].all() and pm[:, 8:].all()
    pm = m.pixel_mask(1, (13, 12))[0, 0]    # larger than the image: pixels past it are kept
    assert not pm[:8, :8].any() and pm[8:, :].all() and pm[:, 8:].all()
    pm = m.pixel_mask(2, (3, 3))[0, 0]      # smaller (cut) map
    assert not pm.any()


def test_image_smaller_than_block():
    m = BlockMask(torch.zeros(3, 0, 1, dtype=torch.bool), 8, (7, 9))
    assert m.grid == (0, 1)
    assert bool(m.pixel_mask(2, (4, 5)).all())
    assert torch.equal(m.keep_ratio(), torch.tensor(1.0))
    assert torch.equal(m.keep_ratio(per_sample=True), torch.ones(3))


def test_properties_keep_ratio_and_cache():
    keep = torch.tensor([[[True, False, True]], [[False, False, False]]])
    src = keep.clone()
    m = BlockMask(src, 5, (7, 16))
    src.fill_(True)                          # the mask holds its own copy
    assert torch.equal(m.keep, keep)
    assert m.block_size == 5 and m.image_size == (7, 16) and m.grid == (1, 3)
    assert m.batch == 2 and m.device == torch.device("cpu")
    assert "BlockMask(" in repr(m)
    r = m.keep_ratio()
    assert isinstance(r, torch.Tensor) and r.dtype == torch.float32
    assert r.item() == pytest.approx(2 / 6)
    assert torch.allclose(m.keep_ratio(per_sample=True), torch.tensor([2 / 3, 0.0]))
    a = m.pixel_mask(2, (4, 8))
    assert m.pixel_mask((2, 2), torch.Size([4, 8])) is a     # cached; int and pair are one key
    assert m.pixel_mask(2, (4, 7)) is not a
    assert torch.equal(BlockMask(keep, 5, (7, 16)).pixel_mask(2, (4, 8)), a)
    assert m.to("cpu") is m
    moved = m.to("meta")
    assert moved.device.type == "meta" and moved.grid == m.grid and moved.image_size == m.image_size
    assert moved.pixel_mask(2, (4, 8)).device.type == "meta"


def test_keep_changed_in_place_raises_at_next_use():
    # The caches describe the keep the mask was made with: a mask refilled in place (one object
    # reused step after step) silently ran the first step's keep.
    import effssl_kernels as ek
    from effssl_kernels.sparse import TileIndex

    k1 = torch.ones(2, 2, 2, dtype=torch.bool)
    k1[0, 0, 0] = False
    mask = BlockMask(k1, 8, 16)
    mask.pixel_mask(1, 16)
    TileIndex.from_mask(mask, 1)
    mask.keep[1, 1, 1] = False
    match = "changed in place"
    with pytest.raises(RuntimeError, match=match):
        mask.pixel_mask(1, 16)
    with pytest.raises(RuntimeError, match=match):
        TileIndex.from_mask(mask, 2)
    with pytest.raises(RuntimeError, match=match):
        with ek.block_mask(mask):
            pass
    with pytest.raises(RuntimeError, match=match):  # a direct conv on the mask too
        ek.sparse_conv2d(torch.randn(2, 3, 16, 16), torch.randn(4, 3, 3, 3), padding=1, mask=mask)
    k1[1, 1, 1] = False  # the caller's tensor was cloned: changing it is fine
    BlockMask(k1, 8, 16).pixel_mask(1, 16)


def test_anisotropic_stride_and_size():
    keep = random_keep(2, 3, 5, seed=3)
    m = BlockMask(keep, 4, (12, 21))
    got = m.pixel_mask((2, 4), (6, 6))
    # Oracle: upsample the input keep map and OR-pool with a 2 x 4 window.
    full = torch.ones(2, 1, 12, 24)
    full[:, 0, :12, :20] = keep.float().repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.equal(got, F.max_pool2d(full, (2, 4), (2, 4)).bool())


def test_meta_device():
    keep = torch.ones(2, 3, 3, dtype=torch.bool, device="meta")
    m = BlockMask(keep, 4, 12)
    assert m.device.type == "meta"
    pm = m.pixel_mask(2, (6, 6))
    assert pm.device.type == "meta" and pm.shape == (2, 1, 6, 6) and pm.dtype == torch.bool
    assert m.keep_ratio().device.type == "meta"
    assert m.to("meta") is m


@pytest.mark.parametrize("keep,B,size,exc,msg", [
    (torch.ones(2, 4, 4), 4, 16, TypeError, "bool"),
    (torch.ones(2, 4, 4, dtype=torch.int64), 4, 16, TypeError, "bool"),
    ([[[True]]], 4, 4, TypeError, "torch.Tensor"),
    (torch.ones(4, 4, dtype=torch.bool), 4, 16, ValueError, r"\[N, Hb, Wb\]"),
    (torch.ones(1, 2, 4, 4, dtype=torch.bool), 4, 16, ValueError, r"\[N, Hb, Wb\]"),
    (torch.ones(2, 4, 4, dtype=torch.bool), 0, 16, ValueError, "block_size must be positive"),
    (torch.ones(2, 4, 4, dtype=torch.bool), -4, 16, ValueError, "block_size must be positive"),
    (torch.ones(2, 4, 4, dtype=torch.bool), 4.0, 16, TypeError, "block_size"),
    (torch.ones(2, 4, 4, dtype=torch.bool), True, 16, TypeError, "block_size"),
    (torch.ones(2, 4, 4, dtype=torch.bool), 4, (16, 0), ValueError, "image_size must be positive"),
    (torch.ones(2, 4, 4, dtype=torch.bool), 4, (16, 16, 3), ValueError, "pair"),
    (torch.ones(2, 4, 4, dtype=torch.bool), 4, (16, 20), ValueError, "does not match"),
    (torch.ones(2, 4, 4, dtype=torch.bool), 5, 16, ValueError, "does not match"),
    (torch.ones(2, 5, 5, dtype=torch.bool), 4, 19, ValueError, "does not match"),  # edge cells
])
def test_bad_construction(keep, B, size, exc, msg):
    with pytest.raises(exc, match=msg) as e:
        BlockMask(keep, B, size)
    assert str(e.value).startswith("BlockMask: ")  # the message names the class


def test_bad_pixel_mask_args():
    m = BlockMask(torch.ones(1, 2, 2, dtype=torch.bool), 4, 8)
    with pytest.raises(ValueError, match="BlockMask.pixel_mask: stride must be positive"):
        m.pixel_mask(0, (8, 8))
    with pytest.raises(TypeError, match="stride"):
        m.pixel_mask(1.5, (8, 8))
    with pytest.raises(ValueError, match="non-negative"):
        m.pixel_mask(1, (-1, 8))
    with pytest.raises(ValueError, match="pair"):
        m.pixel_mask(1, (1, 8, 8))
