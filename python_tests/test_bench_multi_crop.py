"""bench/bench_multi_crop.py's baselines crop what ``multi_crop`` crops (so the bench times the
same work), and the torchvision loop's ``limit`` crops the first patches only."""
import pytest
import torch

pytest.importorskip("torchvision")

import effssl_kernels as ek
from bench import bench_multi_crop as bm


def _case(N=2, P=5, H=40, W=56, S=12):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, H, W), generator=gen, dtype=torch.uint8)
    boxes = bm.random_boxes(N, P, H, W, (0.14, 1.0), gen)
    flips = torch.rand(N, P, generator=gen) < 0.5
    assert flips.any() and not flips.all()
    return images, boxes, flips, S


def test_torchvision_loop_crops_the_first_patches():
    images, boxes, flips, S = _case()
    ours = ek.multi_crop(images, boxes, flips, S, out_dtype=torch.float32)  # [N * P, 3, S, S]
    for limit in (None, 3, 7, 100):
        loop = bm.torchvision_loop(images, boxes, flips, S, limit)
        assert len(loop) == min(limit or 10, 10)
        # torchvision resizes uint8 in fixed point and rounds: one level apart at most
        torch.testing.assert_close(torch.stack(loop), ours[: len(loop)], atol=1.01, rtol=0)


@pytest.mark.parametrize("crop", [bm.roi_align_crop, bm.grid_sample_crop])
def test_batched_baselines_crop_the_same_patches(crop):
    images, boxes, flips, S = _case()
    ours = ek.multi_crop(images, boxes, flips, S, out_dtype=torch.float32)  # [N * P, 3, S, S]
    got = crop(images, boxes, flips, S)
    assert got.shape == ours.shape
    # roi_align / grid_sample sample bilinearly at other points near the borders: the bulk agrees
    assert (got - ours).abs().median() < 1.0
