"""The benchmarks' byte and FLOP counts and keep ratios against hand counts: a wrong formula
would give a wrong GB/s, % of copy bandwidth or TFLOP/s on the GPU, where nobody can rerun it
cheaply, and the timings alone never show it."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench import bench_block_match as bbm
from bench import bench_gather_tokens as bgt
from bench import bench_multi_crop as bmc
from bench import bench_simsiam_step as bss
from bench import bench_sparse_conv as bsc
from bench.common import kept_count


def test_kept_count_never_keeps_fewer_than_it_says():
    assert [kept_count(k, 49) for k in (1.0, 0.8, 0.75, 0.65, 0.5, 0.25, 0.0)] == [49, 40, 37, 32, 25, 13, 0]
    assert kept_count(0.7, 10) == 7  # 0.7 * 10 is 7.000000000000001 in floating point
    assert kept_count(0.5, 196) == 98
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep must be in"):
            kept_count(bad, 49)


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_masks_keep_exactly_kept_count(keep):
    g = torch.Generator().manual_seed(0)
    k = kept_count(keep, 49)
    assert (bsc.random_mask(3, keep, "cpu", g).keep.sum((1, 2)) == k).all()
    assert (bss.random_keep(3, 7, keep, g, "cpu").sum((1, 2)) == k).all()


def test_multi_crop_source_bytes_is_the_union_of_the_boxes():
    # image 0: 2x3 at (0, 0) and 2x3 at (1, 1) overlap in 2 pixels: 10; image 1: one box twice: 4
    boxes = torch.tensor([[[0, 0, 2, 3], [1, 1, 2, 3]], [[2, 2, 2, 2], [2, 2, 2, 2]]], dtype=torch.float32)
    assert bmc.source_bytes(boxes, 3, 4, 6) == 3 * (10 + 4)
    g = torch.Generator().manual_seed(1)
    boxes = bmc.random_boxes(5, 3, 20, 30, (0.05, 0.6), g)
    want = 0
    for per_image in boxes.long().tolist():
        covered = torch.zeros(20, 30, dtype=torch.bool)
        for t, l, h, w in per_image:  # noqa: E741
            covered[t:t + h, l:l + w] = True
        want += int(covered.sum())
    assert bmc.source_bytes(boxes, 3, 20, 30) == 3 * want < 3 * 5 * 20 * 30


def test_gather_tokens_traffic_is_counted_once_per_byte():
    N, K, D, es, L = 2, 3, 4, 2, bgt.L
    x_rows, out, pos, index = N * K * D * es, N * K * D * es, L * D * es, N * K * 8
    assert bgt.traffic_bytes(N, K, D, es, False) == x_rows + pos + index + out
    # backward: reads the output gradient and the index, writes grad_x (zeros included) and grad_pos
    back = N * K * D * es + index + N * L * D * es + L * D * es
    assert bgt.traffic_bytes(N, K, D, es, True) == x_rows + pos + index + out + back


@pytest.mark.parametrize("layer", bsc.LAYERS, ids=[la[0] for la in bsc.LAYERS])
def test_sparse_conv_flop_of_all_blocks_is_the_dense_conv(layer):
    name, cin, cout, k, stride, padding, in_stride = layer
    side = bsc.IMAGE // in_stride
    x = torch.zeros(1, cin, side, side, device="meta")
    w = torch.zeros(cout, cin, k, k, device="meta")
    with FlopCounterMode(display=False) as fc:
        F.conv2d(x, w, stride=stride, padding=padding)
    assert bsc.forward_flop(1, bsc.GRID, cin, cout, k, stride, in_stride) == fc.get_total_flops(), name
    assert bsc.forward_flop(1, 25, cin, cout, k, stride, in_stride) * bsc.GRID == 25 * fc.get_total_flops()


@pytest.mark.parametrize("H,B,r", [(224, 32, 16), (224, 30, 15), (32, 4, 4), (32, 5, 5), (13, 4, 6)])
def test_block_match_candidates_counts_every_in_bounds_displacement(H, B, r):
    n = 0
    for i in range(H // B):
        for j in range(H // B):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    n += 0 <= i * B + dy <= H - B and 0 <= j * B + dx <= H - B
    assert bbm.candidates(H, B, r) == n
