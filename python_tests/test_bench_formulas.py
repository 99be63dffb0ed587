"""The benchmarks' byte and FLOP counts and keep ratios against hand counts: a wrong formula
would give a wrong GB/s, % of copy bandwidth or TFLOP/s on the GPU, where nobody can rerun it
cheaply, and the timings alone never show it."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench import bench_block_match as bbm
from bench import bench_gather_tokens as bgt
from bench import bench_halo_gather as bhg
from bench import bench_multi_crop as bmc
from bench import bench_patch_embed_gather as bpe
from bench import bench_simsiam_step as bss
from bench import bench_sparse_conv as bsc
from bench import bench_vit_step as bvs
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


_HAND_INFO = {"device": "test", "fp32_tflops_limit": 1e-3, "limit_source": "test", "hbm_tbps_limit": None}


def test_block_match_flop_and_speedup_by_hand(monkeypatch):
    monkeypatch.setattr(bbm, "GPU_CASES", [("32px B4 r4", 512, 32, 4, 4)])
    monkeypatch.setattr(bbm, "CPU_PAIRS", {32: 4})  # quick: 4 // 4 = 1 pair
    monkeypatch.setattr(bbm, "device_info", lambda d: dict(_HAND_INFO))
    # two of our kernels (the GPU's cuda and triton): the speedups are over the FIRST that ran
    monkeypatch.setattr(bbm, "providers", lambda device, quick, r: {"cpp": "auto", "triton": "auto",
                                                                   "shift loop (torch)": "shift"})
    ms = iter([2.0, 1.0, 8.0])
    monkeypatch.setattr(bbm, "time_ms", lambda fn, device, min_run_time: {"median_ms": next(ms)})
    rows, _ = bbm.run("cpu", quick=True)
    by = {r["provider"]: r for r in rows}
    # 32 px, B 4, r 4: per axis, blocks 0 and 7 have 5 in-bounds shifts, blocks 1-6 have 9: 64;
    # 64 * 64 = 4096 (block, candidate) pairs; 3 FLOP (sub, mul, add) x 3 channels x 16 pixels
    # each: 589,824 FLOP in 2 ms = 2.94912e-4 TFLOP/s = 29.4912% of 1e-3
    assert by["cpp"]["tflops"] == pytest.approx(589824 / 2e-3 / 1e12)
    assert by["cpp"]["pct_fp32_limit"] == pytest.approx(29.4912)
    assert [by[p]["ours_speedup"] for p in ("cpp", "triton", "shift loop (torch)")] == [1.0, 0.5, 4.0]


def test_gather_tokens_copy_yardstick_counts_read_and_write(monkeypatch):
    monkeypatch.setenv("EFFSSL_BENCH_TINY", "1")  # N=2, ViT-S D=384, keep 0.5: K=98, float32
    monkeypatch.setattr(bgt, "device_info", lambda d: dict(_HAND_INFO))
    monkeypatch.setattr(bgt, "time_ms", lambda fn, device, min_run_time: {"median_ms": 1.0})
    monkeypatch.setattr(bgt, "timed_row", lambda row, fn, device, mrt: {**row, "median_ms": 1.0}
                        if "compile" not in row["provider"] else {**row, "note": "not timed"})
    rows, *_ = bgt.run("cpu", quick=True)
    copy = next(r for r in rows if r["provider"] == "copy (yardstick)")
    ours = next(r for r in rows if r["provider"] == "ours" and r["mode"] == "fwd")
    # copy: the output's 2*98*384*4 = 301,056 B read and written: 602,112 B in 1 ms
    assert copy["gbps"] == pytest.approx(602112e-6) and copy["pct_copy_bw"] == pytest.approx(100)
    # ours fwd: kept rows 301,056 + pos 196*384*4 = 301,056 + keep 2*98*8 = 1,568 + out 301,056
    assert ours["gbps"] == pytest.approx(904736e-6)
    assert ours["pct_copy_bw"] == pytest.approx(100 * 904736 / 602112)


def test_patch_embed_gather_flop_speedups_and_limit_by_hand(monkeypatch):
    monkeypatch.setenv("EFFSSL_BENCH_TINY", "1")  # N=2, ViT-S D=384; quick: keep 0.5, K=98
    monkeypatch.setattr(bpe, "device_info", lambda d: dict(_HAND_INFO))
    monkeypatch.setattr(torch, "compile", lambda f, **k: f)
    ms = iter([1.0, 3.0, 2.0] * 2)  # per mode: ours, timm path, torch.compile
    monkeypatch.setattr(bpe, "time_ms", lambda fn, device, min_run_time: {"median_ms": next(ms)})
    rows, _ = bpe.run("cpu", quick=True)
    fwd, bwd = (next(r for r in rows if r["provider"] == "ours" and r["mode"] == m) for m in ("fwd", "fwd+bwd"))
    # 2 FLOP x N 2 x K 98 x D 384 x 3*16*16 = 115,605,504 FLOP per forward GEMM, in 1 ms;
    # fwd+bwd adds the weight-gradient GEMM only (images need no gradient): x2
    assert fwd["tflops"] == pytest.approx(0.115605504) and bwd["tflops"] == pytest.approx(0.231211008)
    assert fwd["pct_limit"] == pytest.approx(100 * 0.115605504 / 1e-3)
    assert (fwd["speedup_vs_torch"], fwd["speedup_vs_compile"]) == (3.0, 2.0)
    # bf16 on a GPU divides by the bf16 GEMM ceiling, not the FP32 one
    info = {"device": "NVIDIA H100 80GB HBM3", "bf16_tflops_limit": 700.0, "fp32_tflops_limit": 50.0,
            "limit_source": "x"}
    assert bpe._limit(info, "cuda", torch.bfloat16)[0] == 700.0
    assert bpe._limit(info, "cpu", torch.float32)[0] == 50.0


def test_multi_crop_traffic_and_loop_scaling_by_hand(monkeypatch):
    # one 8x8 image, 2 boxes of 4x4 at (0, 0) and (2, 2) (union 16 + 16 - 4 = 28 px), 2x2 crops
    monkeypatch.setattr(bmc, "_cases", lambda d, q: [("t", 1, 8, 8, 2, 2, (0.25, 0.25))])
    monkeypatch.setattr(bmc, "random_boxes", lambda *a: torch.tensor([[[0, 0, 4, 4], [2, 2, 4, 4]]], dtype=torch.float32))
    monkeypatch.setattr(bmc, "LOOP_PATCHES", 1)  # the loop timed on 1 of 2 patches, scaled x2
    monkeypatch.setattr(bmc, "device_info", lambda d: dict(_HAND_INFO))
    t1 = {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "samples": 1}
    monkeypatch.setattr(bmc, "time_ms", lambda fn, device, min_run_time: dict(t1))
    monkeypatch.setattr(bmc, "timed_row", lambda row, fn, device, mrt: {**row, **t1})
    rows, _ = bmc.run("cpu")
    by = {r["provider"]: r for r in rows}
    # output: 2 patches x 3 x 2 x 2 = 24 float32 = 96 B written; input: 3 x 28 = 84 B inside the
    # boxes, but at most one read per output element: 24 B. ours: 24 + 96 = 120 B in 1 ms.
    # copy yardstick: 24 uint8 read + 24 float32 written = 120 B in 1 ms.
    assert by["ours"]["gbps"] == pytest.approx(120e-6) and by["copy (yardstick)"]["gbps"] == pytest.approx(120e-6)
    assert by["ours"]["pct_copy_bw"] == pytest.approx(100)
    loop = by["torchvision v2 loop"]
    assert loop["median_ms"] == 2.0 and loop["ours_speedup"] == 2.0 and loop["gbps"] == pytest.approx(60e-6)


def test_halo_gather_traffic_by_hand(monkeypatch):
    monkeypatch.setenv("EFFSSL_BENCH_TINY", "1")  # N=1, layer2: 4x4 tiles, C=128, 25 kept blocks
    monkeypatch.setattr(bhg, "device_info", lambda d: dict(_HAND_INFO))
    monkeypatch.setattr(bhg, "time_ms", lambda fn, device, min_run_time: {"median_ms": 1.0})
    monkeypatch.setattr(bhg, "timed_row", lambda row, fn, device, mrt: {**row, "median_ms": 1.0})
    rows, *_ = bhg.run("cpu", quick=True)
    by = {(r["mode"], r["provider"]): r for r in rows}
    # T = 25 tiles: in 25*128*4*4*4 = 204,800 B, out (6x6 haloed) 25*128*6*6*4 = 460,800 B;
    # table int64 [25, 6, 6] = 7,200 B; inverse: order [900] + offsets [25*16 + 1] = 10,408 B
    assert by[("copy", "copy (yardstick)")]["gbps"] == pytest.approx(2 * 460800e-6)
    assert by[("fwd", "ours")]["gbps"] == pytest.approx((204800 + 460800 + 7200) * 1e-6)
    assert by[("fwd+bwd", "ours")]["gbps"] == pytest.approx((2 * (204800 + 460800) + 7200 + 10408) * 1e-6)


def test_sparse_conv_flop_kept_and_rounds_by_hand(monkeypatch):
    monkeypatch.setenv("EFFSSL_BENCH_TINY", "1")  # N=1, layers stem and l3 3x3, keeps 1.0 / 0.5
    monkeypatch.setattr(bsc, "device_info", lambda d: dict(_HAND_INFO))
    monkeypatch.setattr(bsc, "time_ms", lambda fn, device, min_run_time: {"median_ms": 1.0})
    rows, _ = bsc.run("cpu", quick=True)
    dense = {r["mode"]: r for r in rows if r["layer"] == "l3 3x3" and r["provider"] == "dense"}
    # l3 3x3 at 14 px: 49 blocks of 2x2 output pixels = 196 px x 256 x 256 x 9 x 2 FLOP =
    # 231,211,008 per forward; forward + grad input + grad weight = 3x
    assert dense["fwd"]["tflops"] == pytest.approx(0.231211008)
    assert dense["fwd+bwd"]["tflops"] == pytest.approx(3 * 0.231211008)
    half = next(r for r in rows if r["keep"] == 0.5 and r["provider"] == "ours packed")
    assert half["kept"] == half["ideal"] == 25 / 49  # ceil(0.5 * 49) = 25 of 49 blocks
    # a NaN error is a mismatch; the fastest round is kept
    r = bsc._row("l", 0.5, "fwd", "ours packed", {"median_ms": 1.0}, {"median_ms": 2.0}, 1e9, float("nan"), 1e-4)
    assert r["note"].startswith("MISMATCH") and r["rel_dense"] == 0.5 and r["speedup_vs_dense"] == 2.0
    seq = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(bsc, "time_ms", lambda fn, device, min_run_time: {"median_ms": next(seq)})
    assert bsc._measure_rounds([lambda: None], "cpu", 3, 0.1) == [{"median_ms": 1.0}]


def test_simsiam_step_derived_columns_by_hand():
    rows = [{"provider": "dense", "keep": 1.0, "kept": 1.0, "rel_time": 1.0, "saved_mib": 200.0},
            {"provider": "packed", "keep": 0.0, "kept": 0.0, "rel_time": 0.2, "saved_mib": 20.0},
            {"provider": "packed", "keep": 0.5, "kept": 25 / 49, "rel_time": 0.5, "saved_mib": 100.0}]
    bss._derive(rows)
    assert [r["rel_saved"] for r in rows] == [1.0, 0.1, 0.5]  # saved / dense's saved
    # f = 0.2; keep 0.5 keeps 25/49: ideal 1 / (25/49 * 0.8 + 0.2), speedup 1 / 0.5 = 2
    assert rows[2]["speedup"] == 2.0
    assert rows[2]["ideal_speedup"] == pytest.approx(1 / (25 / 49 * 0.8 + 0.2))


def test_vit_step_rel_time_is_over_the_sweeps_baseline(monkeypatch):
    monkeypatch.setattr(bvs, "MODELS", bvs.MODELS[:1])
    monkeypatch.setattr(bvs, "_model", lambda *a, **k: object())
    monkeypatch.setattr(bvs, "_step_fn", lambda step, v1, v2, keep, patch, device, amp:
                        (lambda: None, (v1.shape[-1] // patch) ** 2))
    # keep sweep 1.0, 0.5, 0.75, 0.25; patch sweep 16, 24, 30, 40
    ms = iter([10.0, 5.0, 7.5, 2.5, 10.0, 4.0, 3.0, 2.0])
    monkeypatch.setattr(bvs, "time_ms", lambda fn, device, min_run_time: {"median_ms": next(ms)})
    rows, _ = bvs.run("cpu", quick=True)
    assert [r["rel_time"] for r in rows] == [1.0, 0.5, 0.75, 0.25, 1.0, 0.4, 0.3, 0.2]
