"""The removal study's core (bench/study_removal.py) on tiny cases, so the script does not rot."""
import pytest
import torch

import effssl_kernels as ek
from bench import study_removal as study  # the repository root is on pythonpath (pyproject.toml)
from bench.real_images import _to_chw

THRESHOLDS = (10.0, 20.0, 30.0)


def _views(a, b, box_a, box_b, flip_a=False, flip_b=False):
    n = a.shape[0]
    box = lambda x: torch.tensor([x], dtype=torch.float32).expand(n, 4)
    flag = lambda f: torch.full((n,), f, dtype=torch.bool)
    return ek.TwoViews(a, b, box(box_a), box(box_b), flag(flip_a), flag(flip_b))


def test_identical_views_are_all_removed():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 32, 32, generator=g)
    box = (5.0, 7.0, 32.0, 32.0)
    for geometry in (True, False):
        ratio, matched = study.removal_ratios(_views(a, a.clone(), box, box), 8, 4, THRESHOLDS, geometry=geometry)
        assert ratio.shape == (3, 2, len(THRESHOLDS))
        assert torch.all(ratio == 1.0) and torch.all(matched == 1.0)


def test_mirrored_view_needs_the_geometry():
    # B is A mirrored, and its recorded flip says so: the geometry-aware search finds every block;
    # the same-grid search (no flip) sees noise against different noise.
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 32, 32, generator=g)
    box = (0.0, 0.0, 32.0, 32.0)
    views = _views(a, a.flip(-1), box, box, flip_a=False, flip_b=True)
    geo, _ = study.removal_ratios(views, 4, 2, THRESHOLDS, geometry=True)
    grid, _ = study.removal_ratios(views, 4, 2, THRESHOLDS, geometry=False)
    assert torch.all(geo == 1.0)
    assert grid[..., 1].max() < 0.1  # 20 dB


def test_independent_noise_is_not_removed():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(2, 4, 3, 32, 32, generator=g)
    box = (0.0, 0.0, 64.0, 64.0)
    for geometry in (True, False):
        ratio, _ = study.removal_ratios(_views(a, b, box, box), 4, 2, THRESHOLDS, geometry=geometry)
        assert ratio[..., 1:].max() == 0.0  # uniform noise pairs sit near 8 dB


def test_real_photo_pipeline():
    skimage_data = pytest.importorskip("skimage.data")
    pytest.importorskip("torchvision")
    s = next(x for x in study.SETTINGS if x.name == "cifar")
    photo = study.Photo("camera", "scene", _to_chw(skimage_data.camera()))
    img = study.source_image(photo, s)
    assert img.shape == (3, 32, 32) and 0 <= img.min() and img.max() <= 1
    views = study.draw_views(img, s, 16, seed=0)
    # the same seed draws the same pairs
    again = study.draw_views(img, s, 16, seed=0)
    assert torch.equal(views.box_a, again.box_a) and torch.equal(views.view_b, again.view_b)
    ratio, matched = study.removal_ratios(views, s.headline, s.headline // 2, study.THRESHOLDS)
    assert ratio.min() >= 0 and ratio.max() <= 1
    # a stricter threshold never removes more, and a block with no candidate is never removed
    assert torch.all(ratio[..., 1:] <= ratio[..., :-1])
    assert torch.all(ratio[..., 0] <= matched)
    jittered = study.photometric(views, seed=0)
    assert jittered.view_a.shape == views.view_a.shape and not torch.equal(jittered.view_a, views.view_a)
    summary = study.summarise({"camera": (ratio, matched)}, ["camera"], study.THRESHOLDS)
    at20 = next(b for b in summary["by_threshold"] if b["threshold_db"] == 20.0)
    assert at20["mean"] == pytest.approx(float(ratio[..., 2].mean()))


def test_crossing():
    assert study.crossing((10, 20, 30), (0.6, 0.4, 0.1), 0.3) == pytest.approx(20 + 10 / 3)
    assert study.crossing((10, 20, 30), (0.6, 0.4, 0.35), 0.3) is None
