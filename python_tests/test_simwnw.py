"""SimWnW end to end (effssl_kernels/simwnw.py): box sampling, both directions' masks, views
with recorded geometry, and the masked encoders, each against the composition of the ops it
is built from (block_match, crop_centers, multi_crop, block_mask, token_keep)."""
import math

import numpy as np
import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet

import effssl_kernels as ek
from effssl_kernels.simwnw import _min_keep


def _cifar_resnet():
    m = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = torch.nn.Identity()
    m.fc = torch.nn.Identity()
    return m


# ----------------------------------------------------------------------------- boxes
def test_random_resized_boxes_follow_torchvision():
    from torchvision.transforms import RandomResizedCrop

    gen = torch.Generator().manual_seed(0)
    H, W = 120, 200
    boxes, flips = ek.random_resized_boxes(500, 4, (H, W), generator=gen)
    assert boxes.shape == (500, 4, 4) and flips.shape == (500, 4) and flips.dtype == torch.bool
    t, l, h, w = boxes.unbind(-1)
    assert (t >= 0).all() and (l >= 0).all() and (t + h <= H).all() and (l + w <= W).all()
    assert (h >= 1).all() and (w >= 1).all() and torch.equal(boxes, boxes.round())
    frac = (h * w / (H * W)).mean().item()
    torch.manual_seed(0)
    img = torch.zeros(1, H, W)
    tv = torch.tensor([RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)]).float()
    tv_frac = (tv[:, 2] * tv[:, 3] / (H * W)).mean().item()
    assert abs(frac - tv_frac) < 0.03, (frac, tv_frac)  # same distribution (std error ~0.006)
    assert abs(flips.float().mean().item() - 0.5) < 0.05


def test_random_resized_boxes_edges_and_wide_fallback():
    # a box as wide as the image fits (w <= W), and its top takes all H - h + 1 positions, the
    # last included (torch.randint(0, H - h + 1)); 11 positions, 2000 draws: each one is hit
    boxes, _ = ek.random_resized_boxes(1000, 2, (20, 10), scale=(0.5, 0.5), ratio=(1.0, 1.0),
                                       generator=torch.Generator().manual_seed(0))
    t, l, h, w = boxes.reshape(-1, 4).unbind(-1)
    assert (h == 10).all() and (w == 10).all() and (l == 0).all()
    assert sorted(t.unique().tolist()) == list(range(11))
    # a wide image where no try fits: torchvision's centre crop, left edge (W - w) // 2
    from torchvision.transforms import RandomResizedCrop

    boxes, _ = ek.random_resized_boxes(2, 2, (10, 21), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    tv = RandomResizedCrop.get_params(torch.zeros(1, 10, 21), (1.0, 1.0), (1.0, 1.0))
    assert tv == (0, 5, 10, 10) and torch.equal(boxes, torch.tensor(tv, dtype=torch.float32).expand(2, 2, 4))


def test_random_resized_boxes_ratio_is_width_over_height():
    # ratio is w / h (torchvision's get_params: w = sqrt(area * r)); an asymmetric range tells the sides apart
    boxes, _ = ek.random_resized_boxes(200, 2, (100, 300), scale=(0.1, 0.3), ratio=(2.0, 3.0),
                                       generator=torch.Generator().manual_seed(0))
    t, l, h, w = boxes.reshape(-1, 4).unbind(-1)
    r = w / h
    assert (r > 1.8).all() and (r < 3.3).all(), (r.min(), r.max())


def test_random_resized_boxes_wide_fallback_uses_max_ratio():
    # a 10x40 image with ratio (0.5, 1.0), scale 1: no try fits (h >= 20 > 10); torchvision's
    # fallback for in_ratio 4 > max(ratio): h = H, w = round(H * max(ratio)) = 10, centred
    from torchvision.transforms import RandomResizedCrop

    tv = RandomResizedCrop.get_params(torch.zeros(1, 10, 40), (1.0, 1.0), (0.5, 1.0))
    boxes, _ = ek.random_resized_boxes(2, 3, (10, 40), scale=(1.0, 1.0), ratio=(0.5, 1.0))
    assert tv == (0, 15, 10, 10)
    assert torch.equal(boxes, torch.tensor(tv, dtype=torch.float32).expand(2, 3, 4))


def test_random_resized_boxes_fallback_and_errors():
    # scale 1 with a ratio range that excludes the square image: every try fails -> centre crop
    boxes, _ = ek.random_resized_boxes(3, 2, 100, scale=(1.0, 1.0), ratio=(2.0, 3.0))
    assert torch.equal(boxes, torch.tensor([25.0, 0.0, 50.0, 100.0]).expand(3, 2, 4))
    with pytest.raises(ValueError, match="scale"):
        ek.random_resized_boxes(1, 1, 10, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="hflip_p"):
        ek.random_resized_boxes(1, 1, 10, hflip_p=2.0)
    for bad in ("a", "0.5", None, True, [0.5], torch.tensor([0.5, 0.5])):  # were float()'s own errors
        with pytest.raises(TypeError, match="random_resized_boxes: hflip_p must be a number"):
            ek.random_resized_boxes(1, 1, 10, hflip_p=bad)
    for ok in (np.float32(1.0), torch.tensor(1.0), 1):
        assert ek.random_resized_boxes(2, 1, 10, hflip_p=ok)[1].all()
    with pytest.raises(TypeError, match="random_resized_boxes: generator must be a CPU torch.Generator"):
        ek.random_resized_boxes(1, 1, 10, generator="seed 0")
    if torch.cuda.is_available():
        with pytest.raises(TypeError, match="generator must be a CPU"):
            ek.random_resized_boxes(1, 1, 10, generator=torch.Generator("cuda"))


# ----------------------------------------------------------------------------- masks
def test_identical_views_remove_all_but_min_keep():
    x = torch.rand(3, 3, 32, 32)
    m = ek.simwnw_masks(x, x.clone(), 8)
    assert m.keep_a.shape == (3, 4, 4)
    assert torch.equal(m.keep_a.sum((1, 2)), torch.ones(3, dtype=torch.long))
    assert torch.equal(m.keep_b.sum((1, 2)), torch.ones(3, dtype=torch.long))
    m0 = ek.simwnw_masks(x, x.clone(), 8, min_keep=0)
    assert not m0.keep_a.any() and not m0.keep_b.any()
    torch.testing.assert_close(m0.removal(), torch.ones(2))


def test_independent_views_remove_nothing():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 32, 32, generator=gen), torch.rand(2, 3, 32, 32, generator=gen)
    m = ek.simwnw_masks(a, b, 8)
    assert m.keep_a.all() and m.keep_b.all()
    torch.testing.assert_close(m.removal(), torch.zeros(2))


def test_masks_are_both_directions_of_block_match_with_geometry():
    gen = torch.Generator().manual_seed(2)
    # smooth images with one noisy quadrant: both outcomes occur
    images = torch.nn.functional.interpolate(torch.rand(4, 3, 6, 8, generator=gen), size=(48, 60), mode="bilinear")
    images[:, :, :24, :30] = torch.rand(4, 3, 24, 30, generator=gen)
    boxes, flips = ek.random_resized_boxes(4, 2, (48, 60), scale=(0.3, 1.0), generator=gen)
    v = ek.multi_crop(images, boxes, flips, 32).view(4, 2, 3, 32, 32)
    ba, bb, fa, fb = boxes[:, 0], boxes[:, 1], flips[:, 0], flips[:, 1]
    m = ek.simwnw_masks(v[:, 0], v[:, 1], 8, threshold_db=15.0, boxes_a=ba, boxes_b=bb, flips_a=fa, flips_b=fb,
                        min_keep=0)
    ca, flip = ek.crop_centers(ba, bb, fa, fb, 32, 8)
    cb, _ = ek.crop_centers(bb, ba, fb, fa, 32, 8)
    pa, _ = ek.block_match(v[:, 0], v[:, 1], 8, 4, centers=ca, flip=flip)
    pb, _ = ek.block_match(v[:, 1], v[:, 0], 8, 4, centers=cb, flip=flip)
    assert torch.equal(m.keep_a, pa <= 15.0) and torch.equal(m.keep_b, pb <= 15.0)
    assert torch.equal(m.psnr_a, pa)
    assert m.keep_a.any() and not m.keep_a.all()  # the case exercises both outcomes


def test_min_keep_forces_the_least_similar():
    psnr = torch.tensor([[[30.0, 25.0], [40.0, 21.0]]])
    keep = psnr <= 20
    out = _min_keep(keep, psnr, 2)
    assert torch.equal(out, torch.tensor([[[False, True], [False, True]]]))
    assert torch.equal(_min_keep(torch.ones_like(keep), psnr, 2), torch.ones_like(keep))


def test_each_view_keeps_its_own_least_similar(monkeypatch):
    import effssl_kernels.simwnw as sw_mod

    pa = torch.tensor([[[30.0, 25.0], [40.0, 26.0]]])  # every block similar at 20 dB
    pb = torch.tensor([[[22.0, 35.0], [40.0, 36.0]]])
    outs = iter([(pa, None), (pb, None)])  # block_match A -> B, then B -> A
    monkeypatch.setattr(sw_mod, "block_match", lambda *a, **k: next(outs))
    x = torch.rand(1, 3, 16, 16)
    m = ek.simwnw_masks(x, x, 8, min_keep=1)
    assert m.keep_a.tolist() == [[[False, True], [False, False]]]
    assert m.keep_b.tolist() == [[[True, False], [False, False]]]


def test_removal_is_per_view():
    keep_a = torch.tensor([[[True, False], [False, False]]])
    keep_b = torch.tensor([[[True, True], [False, False]]])
    m = ek.SimWnWMasks(keep_a, keep_b, keep_a.float(), keep_b.float(), 8, (16, 16))
    assert m.removal().tolist() == [0.75, 0.5]


def test_uint8_views_take_a_given_data_range():
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    for dr in (None, 510.0):
        m = ek.simwnw_masks(a, b, 8, data_range=dr)
        want = ek.simwnw_masks(a.float(), b.float(), 8, data_range=255.0 if dr is None else dr)
        assert torch.equal(m.psnr_a, want.psnr_a) and torch.equal(m.psnr_b, want.psnr_b)


def test_use_geometry_false_ignores_the_boxes():
    gen = torch.Generator().manual_seed(2)
    images = torch.nn.functional.interpolate(torch.rand(4, 3, 6, 8, generator=gen), size=(48, 60), mode="bilinear")
    boxes, flips = ek.random_resized_boxes(4, 2, (48, 60), scale=(0.3, 1.0), generator=gen)
    v = ek.multi_crop(images, boxes, flips, 32).view(4, 2, 3, 32, 32)
    geo = (boxes[:, 0], boxes[:, 1], flips[:, 0], flips[:, 1])
    plain = ek.simwnw_masks(v[:, 0], v[:, 1], 8)
    with_geo = ek.SimWnW(8).masks(v[:, 0], v[:, 1], *geo)
    without = ek.SimWnW(8, use_geometry=False).masks(v[:, 0], v[:, 1], *geo)
    assert torch.equal(without.psnr_a, plain.psnr_a) and not torch.equal(with_geo.psnr_a, plain.psnr_a)


def test_token_removal_replaces_only_its_own_masks_entry():
    sw = ek.SimWnW(8)
    x = torch.rand(2, 3, 16, 16)
    mine = sw.masks(x, x.clone())
    before = sw.removal_log()
    sw._record_tokens(ek.simwnw_masks(x, x.clone(), 8), 0.25)  # made elsewhere: never recorded
    assert sw.removal_log() == before
    sw._record_tokens(mine, 0.25)
    assert sw.removal_log() == [(0.25, 0.25)]


def test_mask_errors():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="all of boxes_a"):
        ek.simwnw_masks(x, x, 4, boxes_a=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="min_keep"):
        ek.simwnw_masks(x, x, 4, min_keep=-1)
    with pytest.raises(ValueError, match="match_on"):
        ek.SimWnW(8, match_on="late")
    with pytest.raises(ValueError, match="SimWnW: min_keep"):  # at construction, not the first step
        ek.SimWnW(8, min_keep=-1)
    with pytest.raises(ValueError, match="SimWnW: search_radius"):
        ek.SimWnW(8, search_radius=-1)
    with pytest.raises(TypeError, match="SimWnW: search_radius must be an int"):
        ek.SimWnW(8, search_radius=2.5)
    assert ek.SimWnW(8, search_radius=np.int64(3)).search_radius == 3
    with pytest.raises(ValueError, match="NaN"):  # would silently keep every block
        ek.simwnw_masks(x, x, 4, threshold_db=float("nan"), min_keep=0)
    with pytest.raises(ValueError, match="NaN"):
        ek.SimWnW(8, threshold_db=float("nan"))
    with pytest.raises(TypeError, match="threshold_db must be a number"):
        ek.simwnw_masks(x, x, 4, threshold_db="20")
    with pytest.raises(TypeError, match="SimWnW: block_size must be an int"):
        ek.SimWnW(4.0)
    with pytest.raises(ValueError, match="simwnw_masks: block_size must be at least 1"):
        ek.simwnw_masks(x, x, 0)
    with pytest.raises(ValueError, match="simwnw_masks: search_radius"):
        ek.simwnw_masks(x, x, 4, search_radius=-1)
    with pytest.raises(ValueError, match="SimWnW: block_size must be at least 1"):
        ek.SimWnW(0)


# ----------------------------------------------------------------------------- views
@pytest.mark.parametrize("match_on", ["raw", "augmented"])
def test_views_record_geometry_and_match_where_asked(match_on):
    images = torch.randint(0, 256, (3, 3, 40, 52), dtype=torch.uint8)
    images[:, :, :, :26] = 128  # flat left half: similar blocks exist

    def photometric(x):
        return (x * 0.5 + 0.25).clamp(0, 1)

    sw = ek.SimWnW(8, match_on=match_on)
    v = sw.views(images, 32, scale=(0.5, 1.0), photometric=photometric, generator=torch.Generator().manual_seed(0))
    raw = ek.multi_crop(images, torch.stack([v.boxes_a, v.boxes_b], 1), torch.stack([v.flips_a, v.flips_b], 1), 32,
                        out_dtype=torch.float32).view(3, 2, 3, 32, 32) / 255
    torch.testing.assert_close(v.view_a, photometric(raw[:, 0]))
    torch.testing.assert_close(v.view_b, photometric(raw[:, 1]))
    ma, mb = (raw[:, 0], raw[:, 1]) if match_on == "raw" else (photometric(raw[:, 0]), photometric(raw[:, 1]))
    want = ek.simwnw_masks(ma, mb, 8, boxes_a=v.boxes_a, boxes_b=v.boxes_b, flips_a=v.flips_a, flips_b=v.flips_b)
    assert torch.equal(v.masks.keep_a, want.keep_a) and torch.equal(v.masks.keep_b, want.keep_b)
    assert len(sw.removal_history) == 1
    (ra, rb), = sw.removal_log()
    assert math.isclose(ra, 1 - want.keep_a.float().mean().item(), abs_tol=1e-6)


def test_removal_history_is_bounded_and_drained():
    # a long run must not keep one device tensor per step forever
    x = torch.rand(2, 3, 16, 16)
    sw = ek.SimWnW(8, max_history=3)
    masks = [sw.masks(x, x.flip(-1) if i % 2 else x) for i in range(5)]
    assert len(sw.removal_history) == 3
    want = [tuple(m.removal().tolist()) for m in masks[2:]]
    assert sw.removal_log() == want and len(sw.removal_history) == 3  # reading keeps it
    assert sw.removal_log(clear=True) == want and len(sw.removal_history) == 0
    assert sw.removal_log() == []
    sw.masks(x, x)
    assert len(sw.removal_log(clear=True)) == 1
    with pytest.raises(ValueError, match="SimWnW: max_history must be at least 1"):
        ek.SimWnW(8, max_history=0)
    with pytest.raises(ValueError, match="SimWnW: token_buckets must be at least 1"):
        ek.SimWnW(8, token_buckets=0)


def test_views_with_photometric_samplers():
    """A pair of samplers: each view gets its own per-sample parameters and the fused kernel."""
    images = torch.randint(0, 256, (4, 3, 40, 52), dtype=torch.uint8)
    pair = (ek.PhotometricSampler.byol(1, blur_kernel=5), ek.PhotometricSampler.byol(2, blur_kernel=5))
    sw = ek.SimWnW(8)
    v = sw.views(images, 32, photometric=pair, generator=torch.Generator().manual_seed(0))
    # the same draws, replayed: boxes and flips first, then view A's then view B's parameters
    g = torch.Generator().manual_seed(0)
    crops, boxes, flips = ek.random_crops(images, 2, 32, generator=g)
    pa, pb = pair[0].sample(4, generator=g), pair[1].sample(4, generator=g)
    assert torch.equal(boxes[:, 0], v.boxes_a) and torch.equal(flips[:, 1], v.flips_b)
    torch.testing.assert_close(v.view_a, ek.photometric(crops[:, 0], pa), rtol=0, atol=0)
    torch.testing.assert_close(v.view_b, ek.photometric(crops[:, 1], pb), rtol=0, atol=0)
    assert v.view_a.min() < 0  # normalised
    with pytest.raises(ValueError, match="mean=None"):
        ek.SimWnW(8, match_on="augmented").views(images, 32, photometric=pair[0])
    unnormalised = ek.PhotometricSampler.byol(2, blur_kernel=5, mean=None, std=None)
    with pytest.raises(ValueError, match="mean=None"):  # one normalising sampler of the two is enough
        ek.SimWnW(8, match_on="augmented").views(images, 32, photometric=(pair[0], unnormalised))
    with pytest.raises(TypeError, match="pair"):
        sw.views(images, 32, photometric=(pair[0],))
    with pytest.raises(TypeError, match="pair"):
        sw.views(images, 32, photometric=3)
    # a blur kernel too large for the views fails on every call, not only on draws that blur
    for seed in range(4):
        with pytest.raises(ValueError, match="too large"):
            sw.views(images, 8, photometric=ek.PhotometricSampler(), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- encoders
def _assert_encode_is_block_mask(sw, model, a, b, m, concat):
    """``sw.encode`` equals the sparsified ``model`` under each view's own block mask; returns za."""
    za, zb = sw.encode(model, a, b, m, concat=concat)
    with ek.block_mask(m.keep_a, 8):
        want_a = model(a)
    with ek.block_mask(m.keep_b, 8):
        want_b = model(b)
    torch.testing.assert_close(za, want_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zb, want_b, rtol=1e-5, atol=1e-5)
    return za


@pytest.mark.parametrize("concat", [False, True])
def test_encode_resnet_equals_block_mask(concat):
    torch.manual_seed(0)
    model = ek.sparsify(_cifar_resnet().eval())
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    b[:, :, :16] = a[:, :, :16]  # top half identical: removed in both views
    sw = ek.SimWnW(8, use_geometry=False)
    m = sw.masks(a, b)
    assert not m.keep_a.all() and m.keep_a.any()
    za = _assert_encode_is_block_mask(sw, model, a, b, m, concat)
    assert not torch.allclose(za, model(a))  # the mask changed the features


def _tiny_vit(**kw):
    """A sparsified one-block ViT on 32 px images with 8 px patches (16 tokens), seeded; ``kw``
    go to timm.create_model."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2,
                            num_classes=0, **kw).eval()
    return ek.sparsify_vit(vit)


@pytest.mark.parametrize("buckets", [1, 4])
def test_encode_vit_equals_token_keep(buckets):
    vit = _tiny_vit()
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    b[:, :, :16] = a[:, :, :16]  # block rows 0-1 and blocks (2, 0), (2, 1) identical:
    b[:, :, 16:24, :16] = a[:, :, 16:24, :16]  # 10 of 16 tokens similar in both views
    sw = ek.SimWnW(8, search_radius=0, use_geometry=False, token_buckets=buckets)
    m = sw.masks(a, b)
    assert m.keep_a.sum().item() == m.keep_b.sum().item() == 2 * 6
    za, zb = sw.encode(vit, a, b, m)
    # the 6 kept tokens, topped up to K = 8 with the lowest-index removed ones (all +inf dB)
    want_keep = torch.tensor([[0, 1, 10, 11, 12, 13, 14, 15]] * 2)
    assert torch.equal(m.keep_a.flatten(1).nonzero()[:, 1].view(2, 6), want_keep[:, 2:])
    ka, kb = ek.tokens_from_psnr(m.psnr_a, m.psnr_b, 20.0)
    assert torch.equal(ka, want_keep) and torch.equal(kb, want_keep)
    with ek.token_keep(want_keep):
        torch.testing.assert_close(za, vit(a))
        torch.testing.assert_close(zb, vit(b))
    # the log holds the token removal applied (8 of 16 dropped), not the masks' 10 of 16
    assert sw.removal_log() == [(0.5, 0.5)]
    torch.testing.assert_close(m.removal(), torch.full((2,), 10 / 16))
    with pytest.raises(ValueError, match="patch size"):
        sw16 = ek.SimWnW(16, use_geometry=False)
        sw16.encode(vit, a, b, sw16.masks(a, b))
    # inside ek.patch_size the patch size in force is the one masks must match
    sw16 = ek.SimWnW(16, search_radius=0, use_geometry=False, token_buckets=buckets)
    m16 = sw16.masks(a, b)
    with ek.patch_size(vit, 16):
        za, zb = sw16.encode(vit, a, b, m16)
        ka, kb = ek.tokens_from_psnr(m16.psnr_a, m16.psnr_b, 20.0)
        with ek.token_keep(ka):
            torch.testing.assert_close(za, vit(a))
        with pytest.raises(ValueError, match=r"patch size in force \(16, 16\), got 8"):
            sw.encode(vit, a, b, m)


# one bucket: one K for both views (tokens_from_psnr's), so B is topped up to A's 16 tokens
@pytest.mark.parametrize("buckets,want", [(1, (0.0, 0.0)), (4, (0.0, 0.5))])
def test_encode_vit_logs_each_views_own_removal(buckets, want):
    # views that keep different counts: the log credits each view its own (audit 80: a transposed
    # [N, 2] view of the per-row counts passed while both views kept alike)
    vit = _tiny_vit()
    a = torch.rand(4, 3, 32, 32)
    b = a.clone()
    b[:, :, :, 16:] = torch.rand(4, 3, 32, 16)  # B's right half redrawn: 8 of 16 blocks similar
    sw = ek.SimWnW(8, search_radius=0, use_geometry=False, token_buckets=buckets)
    m = sw.masks(a, b)
    m.keep_a[:] = True  # A keeps every block, B its 8 dissimilar ones
    assert m.keep_b.flatten(1).sum(1).tolist() == [8] * 4
    sw.encode(vit, a, b, m)
    assert sw.removal_log() == [want]


def test_encode_vit_refuses_a_padded_grid_unlike_the_masks():
    # a dynamic_img_pad ViT pads 36 px views to a 5x5 grid at patch 8; the masks have 4x4 blocks,
    # whose flat indices would land on other tokens of the 5x5 grid
    timm = pytest.importorskip("timm")
    vit = ek.sparsify_vit(timm.create_model("vit_small_patch16_224", img_size=36, patch_size=8, depth=1,
                                            embed_dim=16, num_heads=2, num_classes=0, dynamic_img_size=True,
                                            dynamic_img_pad=True).eval())
    a, b = torch.rand(2, 3, 36, 36), torch.rand(2, 3, 36, 36)
    sw = ek.SimWnW(8, search_radius=0, use_geometry=False)
    with pytest.raises(ValueError, match="5x5 patch grid but the masks have 4x4 blocks"):
        sw.encode(vit, a, b, sw.masks(a, b))
    za, _ = sw.encode(vit, a[..., :32, :32], b[..., :32, :32], sw.masks(a[..., :32, :32], b[..., :32, :32]))
    assert za.shape == (2, 16)  # views the patch divides: fine


def test_encode_vit_honours_min_keep_and_the_masks_threshold():
    vit = _tiny_vit()
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    b[:, :, :16] = a[:, :, :16]  # 8 of 16 tokens similar at 20 dB
    with ek.token_keep(torch.arange(16).expand(2, 16)):
        dense_a, dense_b = vit(a), vit(b)
    # min_keep = 12 keeps 12 blocks per view, so K = roundup(12, 8) = 16: every token
    sw = ek.SimWnW(8, search_radius=0, use_geometry=False, min_keep=12)
    m = sw.masks(a, b)
    assert (m.keep_a.flatten(1).sum(1) == 12).all()
    za, zb = sw.encode(vit, a, b, m)
    torch.testing.assert_close(za, dense_a)
    torch.testing.assert_close(zb, dense_b)
    assert sw.removal_log() == [(0.0, 0.0)]
    # masks made at another threshold (nothing, not even +inf dB, is above +inf) keep every
    # token, whatever the encoder's own threshold_db; masks it did not record leave its log alone
    m_all = ek.simwnw_masks(a, b, 8, search_radius=0, threshold_db=float("inf"))
    assert m_all.keep_a.all() and m_all.keep_b.all()
    for buckets, concat in ((4, False), (1, False), (1, True)):
        sw20 = ek.SimWnW(8, search_radius=0, use_geometry=False, token_buckets=buckets)
        za, zb = sw20.encode(vit, a, b, m_all, concat=concat)
        torch.testing.assert_close(za, dense_a)
        torch.testing.assert_close(zb, dense_b)
    assert sw20.removal_log() == []


def _mixed_views():
    """4 pairs whose views share 0, 4, 8 and 12 of their 16 blocks (kept counts 16, 12, 8, 4)."""
    a, b = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    for n, rows in enumerate((0, 1, 2, 3)):
        b[n, :, : 8 * rows] = a[n, :, : 8 * rows]
    return a, b


def test_encode_vit_buckets_run_each_group_with_its_own_k():
    vit = _tiny_vit()
    a, b = _mixed_views()
    sw1 = ek.SimWnW(8, search_radius=0, use_geometry=False, token_buckets=1)
    sw4 = ek.SimWnW(8, search_radius=0, use_geometry=False, token_buckets=4)
    m = sw4.masks(a, b)
    assert m.keep_a.flatten(1).sum(1).tolist() == [16, 12, 8, 4]
    za, zb = sw4.encode(vit, a, b, m)
    (za.square().sum() + zb.sum()).backward()
    got_grads = [p.grad.clone() for p in vit.parameters()]
    # by hand: both views pooled (A's rows 0-3, B's 4-7), sorted by count, 4 groups of 2
    groups = ek.keep_buckets(torch.cat([m.keep_a, m.keep_b]), torch.cat([m.psnr_a, m.psnr_b]), 4)
    assert [k.shape[1] for _, k in groups] == [8, 16]  # counts 4 4 | 8 8 | 12 12 | 16 16, merged
    x, want = torch.cat([a, b]), torch.empty(8, za.shape[1])
    vit.zero_grad()
    loss = 0
    for rows, keep in groups:
        with ek.token_keep(keep):
            z = vit(x[rows])
        want[rows] = z.detach()
        loss = loss + (z * torch.where(rows[:, None] < 4, z, 1)).sum()  # A squared, B summed
    loss.backward()
    torch.testing.assert_close(za, want[:4])
    torch.testing.assert_close(zb, want[4:])
    for p, g in zip(vit.parameters(), got_grads):
        torch.testing.assert_close(g, p.grad)
    # the log holds what each view kept: A's K per sample 16 16 8 8, B's the same
    assert sw4.removal_log() == [(0.25, 0.25)]
    # one K for the batch keeps every token (the sample that shares nothing keeps 16)
    sw1.encode(vit, a, b, sw1.masks(a, b))
    assert sw1.removal_log() == [(0.0, 0.0)]


class _TupleOut(torch.nn.Module):
    """A converted ViT returning ``(z, {"mean": z.mean(1)})``: outputs need not be one tensor."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        z = self.vit(x)
        return z, {"mean": z.mean(1)}


@pytest.mark.parametrize("buckets,concat", [(4, False), (1, False), (1, True)])
def test_encode_vit_structured_outputs(buckets, concat):
    vit = _tiny_vit()
    a, b = _mixed_views()
    sw = ek.SimWnW(8, search_radius=0, use_geometry=False, token_buckets=buckets)
    m = sw.masks(a, b)
    za, zb = sw.encode(vit, a, b, m, concat=concat)
    (ta, da), (tb, db) = sw.encode(_TupleOut(vit), a, b, m, concat=concat)
    for t, d, z in ((ta, da, za), (tb, db, zb)):
        torch.testing.assert_close(t, z)
        torch.testing.assert_close(d["mean"], z.mean(1))


def test_encode_vit_buckets_refuse_batchnorm_in_training():
    vit = _tiny_vit()
    vit.head = torch.nn.BatchNorm1d(16)  # per-group statistics would differ from the batch's
    a, b = _mixed_views()
    sw = ek.SimWnW(8, search_radius=0, use_geometry=False)
    with pytest.raises(ValueError, match="BatchNorm 'head'.*token_buckets=1"):
        sw.encode(vit.train(), a, b, sw.masks(a, b))
    sw.encode(vit.eval(), a, b, sw.masks(a, b))  # running statistics: samples are independent
    vit.head = torch.nn.BatchNorm1d(16, track_running_stats=False)  # batch statistics in eval too
    with pytest.raises(ValueError, match="BatchNorm 'head'"):
        sw.encode(vit.eval(), a, b, sw.masks(a, b))
    za, _ = ek.SimWnW(8, search_radius=0, use_geometry=False, token_buckets=1).encode(vit.train(), a, b,
                                                                                      sw.masks(a, b))
    assert za.shape == (4, 16)
    for bad, exc in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="SimWnW: token_buckets"):
            ek.SimWnW(8, token_buckets=bad)


def test_encode_vit_buckets_refuse_concat():
    # concat=True asks for one call; the buckets ran three, silently (until 2026-12-06)
    vit = _tiny_vit()
    a, b = _mixed_views()
    sw = ek.SimWnW(8, search_radius=0, use_geometry=False)
    with pytest.raises(ValueError, match="concat=True .*token_buckets=1"):
        sw.encode(vit, a, b, sw.masks(a, b), concat=True)
    with pytest.raises(ValueError, match="concat=True .*token_buckets=1"):  # not only for some data
        sw.encode(vit, a[:0], b[:0], sw.masks(a[:0], b[:0]), concat=True)


def test_an_empty_batch_removes_nothing_and_encodes_to_nothing():
    # removal() was a mean over no blocks (NaN in the log), and the ViT path raised from inside
    # keep_buckets while the ResNet path passed the empty batch through (until 2026-12-06)
    sw = ek.SimWnW(8, use_geometry=False)
    a = torch.rand(0, 3, 32, 32)
    m = sw.masks(a, a.clone())
    assert m.removal().tolist() == [0.0, 0.0] and sw.removal_log() == [(0.0, 0.0)]
    for buckets in (4, 1):
        sw = ek.SimWnW(8, use_geometry=False, token_buckets=buckets)
        za, zb = sw.encode(_tiny_vit(), a, a.clone(), sw.masks(a, a.clone()))
        assert za.shape == zb.shape == (0, 16)
    za, zb = sw.encode(ek.sparsify(_cifar_resnet().eval()), a, a.clone(), m)
    assert za.shape[0] == zb.shape[0] == 0


def test_encode_needs_a_converted_model():
    x = torch.rand(1, 3, 16, 16)
    sw = ek.SimWnW(8)
    with pytest.raises(TypeError, match="sparsify"):
        sw.encode(torch.nn.Conv2d(3, 3, 3), x, x, sw.masks(x, x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_do_not_synchronise_and_encode_syncs_once():
    # The contract: masks without a host sync; the masked encoder of both views, one.
    images = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8, device="cuda")
    sw = ek.SimWnW(8)
    boxes, flips = ek.random_resized_boxes(4, 2, (40, 48), device="cuda")
    v = ek.multi_crop(images, boxes, flips, 32, out_dtype=torch.float32).view(4, 2, 3, 32, 32) / 255
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m = sw.masks(v[:, 0], v[:, 1], boxes[:, 0], boxes[:, 1], flips[:, 0], flips[:, 1])
        sw.views(images, 32)  # boxes to the device, multi_crop, masks: no sync either
    finally:
        torch.cuda.set_sync_debug_mode("default")
    model = ek.sparsify(_cifar_resnet().cuda().eval())
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sw.encode(model, v[:, 0].contiguous(), v[:, 1].contiguous(), m)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message)[:200] for w in syncs]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("buckets", [1, 4])
def test_encode_vit_syncs_once(buckets):
    import warnings

    vit = _tiny_vit().cuda()
    a, b = (v.cuda() for v in _mixed_views())
    sw = ek.SimWnW(8, search_radius=0, use_geometry=False, token_buckets=buckets)
    m = sw.masks(a, b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sw.encode(vit, a, b, m)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message)[:200] for w in syncs]


def test_a_uint8_view_with_a_float_view_is_refused():
    # data_range 255 for one and 1 for the other: no PSNR could be right
    a = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(TypeError, match="same dtype"):
        ek.simwnw_masks(a, a.float() / 255, 8)


def test_float_views_take_a_given_data_range():
    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    m1, m2 = ek.simwnw_masks(a, b, 8), ek.simwnw_masks(a, b, 8, data_range=2.0)
    torch.testing.assert_close(m2.psnr_a, m1.psnr_a + 20 * math.log10(2.0))
    torch.testing.assert_close(m2.psnr_b, m1.psnr_b + 20 * math.log10(2.0))


def test_default_radius_of_an_odd_block_is_floor_half():
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(2, 3, 20, 20, generator=g), torch.rand(2, 3, 20, 20, generator=g)
    assert torch.equal(ek.simwnw_masks(a, b, 5).psnr_a, ek.block_match(a, b, 5, 2)[0])


def test_geometry_of_non_square_views():
    # 32 x 48 views: crop_centers must get (H, W), which square views cannot tell from (W, H)
    gen = torch.Generator().manual_seed(2)
    images = torch.nn.functional.interpolate(torch.rand(4, 3, 6, 8, generator=gen), size=(48, 60), mode="bilinear")
    images[:, :, :24, :30] = torch.rand(4, 3, 24, 30, generator=gen)
    boxes, flips = ek.random_resized_boxes(4, 2, (48, 60), scale=(0.3, 1.0), generator=gen)
    v = ek.multi_crop(images, boxes, flips, (32, 48)).view(4, 2, 3, 32, 48)
    ba, bb, fa, fb = boxes[:, 0], boxes[:, 1], flips[:, 0], flips[:, 1]
    m = ek.simwnw_masks(v[:, 0], v[:, 1], 8, boxes_a=ba, boxes_b=bb, flips_a=fa, flips_b=fb)
    ca, flip = ek.crop_centers(ba, bb, fa, fb, (32, 48), 8)
    cb, _ = ek.crop_centers(bb, ba, fb, fa, (32, 48), 8)
    assert torch.equal(m.psnr_a, ek.block_match(v[:, 0], v[:, 1], 8, 4, centers=ca, flip=flip)[0])
    assert torch.equal(m.psnr_b, ek.block_match(v[:, 1], v[:, 0], 8, 4, centers=cb, flip=flip)[0])


def test_a_nan_block_is_never_similar_so_kept():
    a = torch.rand(1, 3, 16, 16)
    b = a.clone()
    a[0, 0, 0, 0] = float("nan")
    m = ek.simwnw_masks(a, b, 8, min_keep=0)
    assert m.psnr_a[0, 0, 0].isnan() and m.psnr_b[0, 0, 0].isnan()
    assert m.keep_a.tolist() == m.keep_b.tolist() == [[[True, False], [False, False]]]


def test_record_false_records_nothing():
    sw = ek.SimWnW(8, record=False)
    x = torch.rand(2, 3, 16, 16)
    sw.masks(x, x.clone())
    assert sw.removal_log() == [] and len(sw.removal_history) == 0


def test_encode_refuses_views_of_different_shapes():
    # B larger than the masks' image: a dynamic-size ViT would run B's 5x5 grid with the 4x4
    # grid's token indices (other tokens, silently)
    vit = _tiny_vit(dynamic_img_size=True)
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 40, 40)
    sw = ek.SimWnW(8, use_geometry=False, token_buckets=1)
    m = sw.masks(a, a.clone())
    with pytest.raises(ValueError, match="do not match the masks"):
        sw.encode(vit, a, b, m)


def test_encode_resnet_each_view_its_own_mask_and_count():
    # views with different masks and kept counts (the other encode tests keep the same blocks in both)
    torch.manual_seed(0)
    model = ek.sparsify(_cifar_resnet().eval())
    g = torch.Generator().manual_seed(7)
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    b[:, :, :, :16] = a[:, :, :, :16]
    sw = ek.SimWnW(8, search_radius=0, use_geometry=False)
    m = sw.masks(a, b)
    m = m._replace(keep_b=m.keep_b.clone())
    m.keep_b[:, 0, 2:] = False  # B drops two more blocks per sample: its mask and count differ from A's
    assert m.keep_a.sum() != m.keep_b.sum()
    for concat in (False, True):
        _assert_encode_is_block_mask(sw, model, a, b, m, concat)


@pytest.mark.parametrize("buckets,concat", [(1, False), (1, True), (4, False)])
def test_encode_vit_tops_each_view_up_by_its_own_psnr(buckets, concat):
    vit = _tiny_vit()
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    sw = ek.SimWnW(8, search_radius=0, use_geometry=False, token_buckets=buckets)
    m = sw.masks(a, b)
    # each view keeps its first block row; its PSNRs rank the removed blocks differently, so the
    # top-up to K = 8 picks other tokens in A and in B
    keep = torch.zeros(2, 4, 4, dtype=torch.bool)
    keep[:, 0] = True
    pa = (torch.arange(16.0).view(1, 4, 4).expand(2, 4, 4) + 30).contiguous()  # A: low index least similar
    pb = pa.flip(-1).flip(-2).contiguous()  # B: high index least similar
    m = m._replace(keep_a=keep, keep_b=keep.clone(), psnr_a=pa, psnr_b=pb)
    za, zb = sw.encode(vit, a, b, m, concat=concat)
    with ek.token_keep(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]] * 2)):
        torch.testing.assert_close(za, vit(a))
    with ek.token_keep(torch.tensor([[0, 1, 2, 3, 12, 13, 14, 15]] * 2)):
        torch.testing.assert_close(zb, vit(b))
