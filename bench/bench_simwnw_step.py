"""SimWnW end to end: a whole training step with the block search included, against dense.

Both steps start from the same uint8 photographs on the device (scikit-image / scikit-learn
bundled photos, bench/real_images.py) and make their two views with ``multi_crop``
(RandomResizedCrop + flip boxes, ``random_crops``), so the data path costs the same.

- SimSiam (ResNet + 3-layer projector + predictor, symmetric negative cosine, stop-grad):
  ``dense`` runs the unconverted model; ``simwnw`` runs ``SimWnW.views`` (views + block search
  in both directions, centred by the crop geometry, 20 dB) and ``SimWnW.encode`` on the
  sparsified backbone (packed tiles, forward and backward).
- DINO-style ViT (student and EMA teacher, DINO head and loss with centring): ``dense`` runs
  both on all tokens; ``simwnw`` drops each view's similar tokens (patch = block, no search
  offset beyond +-p/2) in the student only (the teacher, without gradients, sees whole views),
  with both views' samples run in 4 groups by kept count (``token_buckets=4``, the default);
  ``simwnw, one K`` runs each view in one call with one token count for the batch.
``rel_time`` is simwnw's median over dense's (the issue's targets on an H100: SimSiam ResNet-50
at most 0.85, ViT-S/16 at most 0.8); ``removal`` is the measured mean fraction of blocks
(tokens) removed per view on these photographs at that step.

GPU: ResNet-50 at 224/block 32, batch 256; ViT-S/16 at 224, batch 128; bf16 autocast; dense
with ``cudnn.benchmark`` on (its shapes are fixed), simwnw with it off (its tile count changes
every step, and benchmark mode would time cuDNN's algorithms again at each new count).
CPU: ResNet-18 at 112/block 16, batch 8; ViT-S/16 (4 blocks) at 112, batch 4; fp32.

    python -m bench.bench_simwnw_step [--device cuda|cpu] [--out DIR] [--quick]
"""
from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

import effssl_kernels as ek

from .bench_simsiam_step import SimSiam
from .common import cudnn_benchmark, device_info, live_rows, parse_args, report, timed_row, tiny
from .real_images import photo_batch

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@functools.lru_cache(maxsize=None)
def _stats(device: torch.device):
    return MEAN.to(device), STD.to(device)  # once per device: a copy per call would sync the step


def _normalize(x):
    mean, std = _stats(x.device)
    return (x - mean) / std


def _dense_views(images, size, gen):
    v, _, _ = ek.random_crops(images, 2, size, generator=gen)  # what SimWnW.views crops, unmasked
    return _normalize(v[:, 0]), _normalize(v[:, 1])


class DINOHead(nn.Module):
    def __init__(self, dim: int, out: int, hidden: int = 2048, bottleneck: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out, bias=False))

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=-1))


class DINO(nn.Module):
    """Student/teacher ViT + head; ``loss(t1, t2, s1, s2)`` DINO's cross-entropy with centring."""

    def __init__(self, encoder: nn.Module, dim: int, out: int):
        super().__init__()
        self.student = nn.Sequential(encoder, DINOHead(dim, out))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out))

    def loss(self, t_out, s_out):
        t = [F.softmax((o - self.center) / 0.04, -1) for o in t_out]
        s = [F.log_softmax(o / 0.1, -1) for o in s_out]
        return -0.5 * ((t[0] * s[1]).sum(-1).mean() + (t[1] * s[0]).sum(-1).mean())


def simsiam_case(device, quick):
    import torchvision

    gpu = device == "cuda"
    arch, feat, img, block, batch = ("resnet50", 2048, 224, 32, 256) if gpu else ("resnet18", 512, 112, 16, 8)
    batch //= 4 if quick else 1
    img, batch = (64, 2) if tiny() else (img, batch)
    fmt = torch.channels_last if gpu else torch.contiguous_format
    torch.manual_seed(0)
    dense = SimSiam(getattr(torchvision.models, arch)(), feat).to(device, memory_format=fmt).train()
    sparse = copy.deepcopy(dense)
    ek.sparsify(sparse.backbone, torch.zeros(2, 3, img, img, device=device))
    images = photo_batch(batch, (256, 320) if gpu else (128, 160), device)
    sw = ek.SimWnW(block, threshold_db=20.0)
    gen = torch.Generator().manual_seed(0)

    def dense_step():
        dense.zero_grad(set_to_none=True)
        a, b = _dense_views(images, img, gen)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            loss = dense.head_loss(dense.backbone(a.contiguous(memory_format=fmt)),
                                   dense.backbone(b.contiguous(memory_format=fmt)))
        loss.backward()

    def simwnw_step():
        sparse.zero_grad(set_to_none=True)
        v = sw.views(images, img, photometric=_normalize, generator=gen)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            za, zb = sw.encode(sparse.backbone, v.view_a.contiguous(memory_format=fmt),
                               v.view_b.contiguous(memory_format=fmt), v.masks)
            loss = sparse.head_loss(za, zb)
        loss.backward()

    return f"SimSiam {arch} {img}px block {block} batch {batch}", [("dense", dense_step, None),
                                                                   ("simwnw", simwnw_step, sw)]


def dino_case(device, quick):
    import timm

    gpu = device == "cuda"
    img, batch, depth, out = (224, 128, 12, 65536) if gpu else (112, 4, 4, 4096)
    batch //= 4 if quick else 1
    img, batch, depth, out = (64, 2, 1, 256) if tiny() else (img, batch, depth, out)
    torch.manual_seed(0)
    enc = ek.sparsify_vit(timm.create_model("vit_small_patch16_224", img_size=img, num_classes=0, depth=depth))
    model = DINO(enc, enc.embed_dim, out).to(device).train()
    images = photo_batch(batch, (256, 320) if gpu else (128, 160), device)
    sw = ek.SimWnW(16, search_radius=8, threshold_db=20.0)  # token_buckets=4
    sw1 = ek.SimWnW(16, search_radius=8, threshold_db=20.0, token_buckets=1)
    gen = torch.Generator().manual_seed(0)

    def run(a, b, masks, sw):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            with torch.no_grad():
                t_out = [model.teacher(a), model.teacher(b)]
            if masks is None:
                s_out = [model.student(a), model.student(b)]
            else:
                za, zb = sw.encode(model.student[0], a, b, masks)
                s_out = [model.student[1](za), model.student[1](zb)]
            loss = model.loss(t_out, s_out)
        loss.backward()

    def dense_step():
        run(*_dense_views(images, img, gen), None, None)

    def simwnw_step(sw):
        v = sw.views(images, img, photometric=_normalize, generator=gen)
        run(v.view_a, v.view_b, v.masks, sw)

    return f"DINO ViT-S/16 (depth {depth}) {img}px batch {batch}", [
        ("dense", dense_step, None),
        ("simwnw", lambda: simwnw_step(sw), sw),  # both views' samples in 4 groups by kept count
        ("simwnw, one K (token_buckets=1)", lambda: simwnw_step(sw1), sw1),
    ]


def run(device: str, quick: bool = False):
    info = device_info(device)
    rows = live_rows()
    for make in (simsiam_case, dino_case):
        case, providers = make(device, quick)
        base = None
        for prov, fn, sw in providers:
            if sw is not None:
                sw.removal_history.clear()  # timed_row's warm-up call records too; the log is per row
            # cudnn.benchmark for dense (fixed shapes: a user's best), not for simwnw, whose tile
            # count changes every step (benchmark mode would time cuDNN's algorithms at each one)
            with cudnn_benchmark() if device == "cuda" and prov == "dense" else contextlib.nullcontext():
                row = timed_row({"case": case, "provider": prov}, fn, device,
                                0.5 if quick else (2.0 if device == "cuda" else 5.0))
            if "median_ms" in row:
                if prov == "dense":
                    base = row["median_ms"]
                else:
                    log = sw.removal_log()
                    row["removal"] = sum(a + b for a, b in log) / (2 * len(log)) if log else None
                if base:
                    row["rel_time"] = row["median_ms"] / base
            rows.append(row)
    return rows, info


def main(argv=None) -> str:
    args = parse_args(__doc__, "a quarter of the batch, shorter timing", argv, name="simwnw_step")
    rows, info = run(args.device, args.quick)
    return report(args, "simwnw_step", f"SimWnW training step vs dense on {info['device']} "
                  "(rel_time: simwnw / dense; removal: measured fraction removed per view)",
                  info, rows, ["case", "provider", "median_ms", "p20_ms", "p80_ms", "rel_time", "removal", "note"])


if __name__ == "__main__":
    main()
