"""multi_crop: our one-launch crop-resize-flip against what a user has on device tensors.

Cases (uint8 images in, float32 patches out, values 0..255):
- SimWnW: 2 views of 224x224 per image from 256x320 images (N=256 on a GPU, 16 on a CPU);
- EMP-SSL: 20 and 200 patches of 32x32 per 32x32 CIFAR image, RandomResizedCrop boxes of
  scale (0.25, 0.25) (N=256 on a GPU; 32 and 8 on a CPU).
Providers:
- ours: ``effssl_kernels.multi_crop`` (C++ on a CPU, Triton on a GPU);
- torchvision v2 loop: ``resized_crop(antialias=False)`` + ``horizontal_flip`` per patch, the
  per-sample loop of a GPU augmentation pipeline; timed on the first 256 patches and scaled to
  all of them (said in the note), since 51,200 launches per call make the suite crawl;
- roi_align: ``torchvision.ops.roi_align(aligned=True, sampling_ratio=1)`` (one bilinear sample
  per output pixel at the same points, clamped at the border instead of zero) + flip by
  ``torch.where``, on float32 images (the uint8 -> float32 conversion is timed with it);
- grid_sample: ``F.affine_grid`` of the boxes + ``F.grid_sample(bilinear, zeros,
  align_corners=False)`` + the same flip, on float32 images;
- copy: ``out.copy_(src)`` of the output's bytes from a same-sized uint8 source, the bandwidth
  yardstick.
GB/s counts the least traffic: every input byte a patch needs read once (the union of an
image's boxes, ``source_bytes``: two 224 crops cover ~70% of a 256x320 image; at most one per
output element) and one float32 write of the output; the copy's GB/s counts its own bytes (uint8 read, float32
write of the output's size), and ``pct_copy_bw`` is GB/s over the copy's.

    python -m bench.bench_multi_crop [--device cuda|cpu] [--out DIR] [--quick]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from effssl_kernels.ops.multi_crop import multi_crop
from effssl_kernels.reference.multi_crop import multi_crop_reference

from .common import (CaseRows, check_output, device_info, pct_hbm, live_rows, mark_speedups, parse_args, report,
                     time_ms, timed_row, tiny)

LOOP_PATCHES = 256


def _cases(device: str, quick: bool):
    gpu = device == "cuda"
    q = 16 if tiny() else 4 if quick else 1
    return [
        ("SimWnW 2 views 224 from 256x320", max(1, (256 if gpu else 16) // q), 256, 320, 2, 224, (0.08, 1.0)),
        ("EMP-SSL 20 patches 32 from 32x32", max(1, (256 if gpu else 32) // q), 32, 32, 20, 32, (0.25, 0.25)),
        ("EMP-SSL 200 patches 32 from 32x32", max(1, (256 if gpu else 8) // q), 32, 32, 200, 32, (0.25, 0.25)),
    ]


def random_boxes(N: int, P: int, H: int, W: int, scale, gen) -> torch.Tensor:
    """RandomResizedCrop-style int boxes ``[N, P, 4]`` (area fraction ``scale``, ratio 3/4..4/3)."""
    area = H * W * torch.empty(N, P).uniform_(*scale, generator=gen)
    logr = torch.empty(N, P).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    r = torch.exp(logr)
    w = torch.sqrt(area * r).round().clamp(1, W)
    h = torch.sqrt(area / r).round().clamp(1, H)
    t = (torch.rand(N, P, generator=gen) * (H - h + 1)).floor()
    l = (torch.rand(N, P, generator=gen) * (W - w + 1)).floor()  # noqa: E741
    return torch.stack([t, l, h, w], -1)


def source_bytes(boxes: torch.Tensor, C: int, H: int, W: int) -> int:
    """uint8 bytes inside the union of each image's boxes ``[N, P, 4]`` (top, left, h, w): what
    the crops must read at least. A 2-D difference array per image (+1 / -1 at the corners,
    summed along both axes) counts how many boxes cover each pixel."""
    N, P = boxes.shape[:2]
    t, l, h, w = boxes.cpu().long().reshape(N * P, 4).unbind(-1)  # noqa: E741
    n = torch.arange(N).repeat_interleave(P)
    diff = torch.zeros(N, H + 1, W + 1, dtype=torch.int32)
    one = torch.ones(N * P, dtype=torch.int32)
    for ys, xs, sign in ((t, l, 1), (t, l + w, -1), (t + h, l, -1), (t + h, l + w, 1)):
        diff.index_put_((n, ys, xs), sign * one, accumulate=True)
    covered = diff.cumsum(1).cumsum(2)[:, :H, :W] > 0
    return C * int(covered.sum())


def torchvision_loop(images, boxes, flips, size, limit=None):
    from torchvision.transforms.v2 import functional as TF

    out = []
    N, P = boxes.shape[:2]
    k = N * P if limit is None else min(limit, N * P)
    # only the boxes this call crops go to Python lists: the time is scaled by N * P / limit
    bl, fl = boxes.reshape(N * P, 4)[:k].long().tolist(), flips.reshape(N * P)[:k].tolist()
    for i in range(k):
        v = TF.resized_crop(images[i // P], *bl[i], size=[size, size], antialias=False).float()
        out.append(TF.horizontal_flip(v) if fl[i] else v)
    return out


def roi_align_crop(images, boxes, flips, size):
    from torchvision.ops import roi_align

    N, P = boxes.shape[:2]
    b = boxes.float()
    idx = torch.arange(N, device=images.device, dtype=torch.float32).repeat_interleave(P)
    t, l, h, w = b.reshape(-1, 4).unbind(-1)  # noqa: E741
    rois = torch.stack([idx, l, t, l + w, t + h], -1)
    out = roi_align(images.float(), rois, (size, size), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return torch.where(flips.reshape(-1, 1, 1, 1), out.flip(-1), out)


def grid_sample_crop(images, boxes, flips, size):
    N, P = boxes.shape[:2]
    C, H, W = images.shape[1:]
    t, l, h, w = boxes.float().reshape(-1, 4).unbind(-1)  # noqa: E741
    # normalised coords (align_corners=False): x_n = (2 x + 1) / W - 1 at pixel centre x
    sx, sy = w / W, h / H
    tx, ty = (2 * l + w) / W - 1, (2 * t + h) / H - 1
    sx = torch.where(flips.reshape(-1), -sx, sx)
    z = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, z, tx], -1), torch.stack([z, sy, ty], -1)], 1)
    grid = F.affine_grid(theta, [N * P, C, size, size], align_corners=False)
    src = images.float().repeat_interleave(P, 0)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def run(device: str, quick: bool = False):
    info = device_info(device)
    rows = live_rows()
    for case, N, H, W, P, S, scale in _cases(device, quick):
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (N, 3, H, W), generator=gen, dtype=torch.uint8).to(device)
        boxes = random_boxes(N, P, H, W, scale, gen).to(device)
        flips = (torch.rand(N, P, generator=gen) < 0.5).to(device)
        n_out = N * P * 3 * S * S
        nbytes = min(source_bytes(boxes, 3, H, W), n_out) + 4 * n_out  # least traffic (module docstring)
        label = f"{case} (N={N}, {N * P} patches)"
        fns = {
            "ours": lambda: multi_crop(images, boxes, flips, S, out_dtype=torch.float32),
            "roi_align": lambda: roi_align_crop(images, boxes, flips, S),
            "grid_sample": lambda: grid_sample_crop(images, boxes, flips, S),
        }
        case_rows = CaseRows(rows)
        for prov, fn in fns.items():
            r = timed_row({"case": label, "provider": prov}, fn, device, 0.3 if quick else 1.0)
            if "median_ms" in r:
                r["gbps"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
                if prov == "ours":  # the timed shape's answer (float32 taps, as the reference)
                    check_output(r, fn(), multi_crop_reference(images, boxes, flips, (S, S), torch.float32), 1e-5)
            case_rows.append(r)
        n_loop = min(LOOP_PATCHES, N * P)
        try:
            torchvision_loop(images, boxes, flips, S, n_loop)
            t = time_ms(lambda: torchvision_loop(images, boxes, flips, S, n_loop), device,
                        min_run_time=0.3 if quick else 1.0)
            f = N * P / n_loop
            t = {k: v * f if k.endswith("_ms") else v for k, v in t.items()}
            case_rows.append({"case": label, "provider": "torchvision v2 loop", **t,
                              "gbps": nbytes / (t["median_ms"] * 1e-3) / 1e9,
                              "note": f"timed on {n_loop} patches, x{f:.4g}" if f > 1 else None})
        except Exception as e:  # report, never hide, a provider that fails (torchvision missing, say)
            case_rows.append({"case": label, "provider": "torchvision v2 loop", "note": f"failed: {e}"[:120]})
        src = torch.randint(0, 256, (n_out,), dtype=torch.uint8, device=device)
        dst = torch.empty(n_out, dtype=torch.float32, device=device)
        t = time_ms(lambda: dst.copy_(src), device, min_run_time=0.3 if quick else 1.0)
        copy_gbps = n_out * (1 + 4) / (t["median_ms"] * 1e-3) / 1e9
        case_rows.append({"case": label, "provider": "copy (yardstick)", **t, "gbps": copy_gbps})
        for r in case_rows:
            if "gbps" in r:
                r["pct_copy_bw"] = 100 * r["gbps"] / copy_gbps
                r["pct_hbm_limit"] = pct_hbm(info, r["gbps"])
        mark_speedups([r for r in case_rows if r["provider"] != "copy (yardstick)"])
    return rows, info


def main(argv=None) -> str:
    args = parse_args(__doc__, "a quarter of the images, shorter timing", argv, name="multi_crop")
    rows, info = run(args.device, args.quick)
    return report(
        args, "multi_crop",
        f"multi_crop on {info['device']}, uint8 -> float32 "
        "(ours_speedup: provider time / ours, >1 means ours is faster)",
        info, rows,
        ["case", "provider", "median_ms", "p20_ms", "p80_ms", "ours_speedup", "gbps", "pct_copy_bw", "pct_hbm_limit", "max_err", "note"],
    )


if __name__ == "__main__":
    main()
