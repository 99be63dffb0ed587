"""One SSL training step of a timm ViT end to end: how much token keep and patch scaling save.

Step = forward + backward of two views through one sparsified encoder (``ek.sparsify_vit``), a
small MLP projector (DINO/MoCo-v3 style: D -> 1024 -> 256, GELU) and a symmetric cross-view
InfoNCE loss (temperature 0.2); gradients are zeroed, no optimizer step. Two sweeps per model:
- keep 1.0 / 0.75 / 0.5 / 0.25 of the 196 patch tokens on 224-px views, a fresh
  ``ek.random_token_keep`` per view per step (K rounded up to a multiple of 8), applied with
  ``ek.token_keep``; the embedding then runs the fused ``patch_embed_gather`` op;
- patch 16 / 24 / 30 / 40 on 240-px views (grids 15 / 10 / 8 / 6) with ``ek.patch_size``
  (PI-resized kernel and bicubic pos-embed every step, as in training), all tokens kept.
``rel_time`` is the median time over that of keep 1.0 (patch 16 for the patch sweep).

GPU: ViT-S/16 and ViT-B/16 at batch 64 per view under bf16 autocast. CPU: batch 2 and depth 2
(noted in the rows) so the run takes a couple of minutes; CPU numbers show overheads, not the
GPU's speedups.

    python -m bench.bench_vit_step [--device cuda|cpu] [--out DIR] [--quick]
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from effssl_kernels.nn import patch_size as vit_patch_size
from effssl_kernels.nn import sparsify_vit, token_keep
from effssl_kernels.tokens import random_token_keep

from .common import device_info, live_rows, parse_args, report, time_ms, tiny

MODELS = [("ViT-S/16", "vit_small_patch16_224"), ("ViT-B/16", "vit_base_patch16_224")]
KEEPS = [1.0, 0.5, 0.75, 0.25]  # 1.0 and issue 4's 0.5 first: a run cut at its time limit has them
PATCHES = [16, 24, 30, 40]


class SSLStep(nn.Module):
    """Encoder + projector; ``loss(v1, v2, keep1, keep2)`` is the symmetric cross-view InfoNCE."""

    def __init__(self, encoder: nn.Module, dim: int, hidden: int = 1024, out: int = 256, temperature: float = 0.2):
        super().__init__()
        self.encoder = encoder
        self.projector = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))
        self.t = temperature

    def embed(self, x, keep):
        with token_keep(keep):
            return F.normalize(self.projector(self.encoder(x)), dim=-1)

    def loss(self, v1, v2, keep1=None, keep2=None):
        z1, z2 = self.embed(v1, keep1), self.embed(v2, keep2)
        logits = z1 @ z2.T / self.t
        labels = torch.arange(z1.shape[0], device=z1.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _model(arch: str, img: int, depth, device: str) -> SSLStep:
    import timm

    kw = {"img_size": img, "num_classes": 0}
    if depth is not None:
        kw["depth"] = depth
    enc = sparsify_vit(timm.create_model(arch, **kw))
    return SSLStep(enc, enc.embed_dim).to(device).train()


def _step_fn(step: SSLStep, v1, v2, keep_ratio: float, patch: int, device: str, amp: bool):
    N = v1.shape[0]
    L = (v1.shape[-1] // patch) ** 2
    gen = torch.Generator(device=device).manual_seed(0)

    def fn():
        step.zero_grad(set_to_none=True)
        ctx = vit_patch_size(step.encoder, patch) if patch != 16 else contextlib.nullcontext()
        k1 = k2 = None
        if keep_ratio < 1.0:  # drawn every step, as training would
            k1 = random_token_keep(N, L, keep_ratio, generator=gen, device=device)
            k2 = random_token_keep(N, L, keep_ratio, generator=gen, device=device)
        with ctx, torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = step.loss(v1, v2, k1, k2)
        loss.backward()

    return fn, L


def run(device: str, quick: bool = False):
    info = device_info(device)
    gpu = device == "cuda"
    batch = 64 if gpu else 2
    depth = None if gpu else (1 if tiny() else 2)
    amp = gpu
    models = MODELS[:1] if (quick and not gpu) else MODELS
    keeps, patches = (KEEPS[::2], PATCHES[::2]) if tiny() else (KEEPS, PATCHES)
    rows = live_rows()
    for name, arch in models:
        note = "bf16 autocast" if amp else f"fp32, depth {depth} (CPU size)"
        for sweep, img, cases in (("keep", 224, [(k, 16) for k in keeps]), ("patch", 240, [(1.0, p) for p in patches])):
            torch.manual_seed(0)
            step = _model(arch, img, depth, device)
            g = torch.Generator().manual_seed(1)
            v1 = torch.rand(batch, 3, img, img, generator=g).to(device)
            v2 = torch.rand(batch, 3, img, img, generator=g).to(device)
            base = None
            for keep_ratio, patch in cases:
                fn, L = _step_fn(step, v1, v2, keep_ratio, patch, device, amp)
                K = L if keep_ratio == 1.0 else random_token_keep(1, L, keep_ratio).shape[1]
                row = {"model": name, "sweep": sweep, "img": img, "batch": batch, "keep": keep_ratio,
                       "patch": patch, "tokens": K + 1, "note": note}
                try:
                    fn()  # warm-up (allocator, pinv cache, cuBLAS plans)
                    t = time_ms(fn, device, min_run_time=0.3 if quick else 1.0)
                except Exception as e:  # report, never hide, a case that fails
                    row["note"] = f"failed: {e}"[:120]
                    rows.append(row)
                    continue
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                    fn()
                    torch.cuda.synchronize()
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
                if (keep_ratio, patch) == cases[0]:  # the sweep's baseline: keep 1.0 / patch 16
                    base = t["median_ms"]
                row.update(t)
                if base is not None:  # the baseline failed: its note says so, no ratio is made up
                    row["rel_time"] = t["median_ms"] / base
                rows.append(row)
            del step
    return rows, info


def main(argv=None) -> str:
    args = parse_args(__doc__, "shorter timing; on CPU ViT-S only", argv, name="vit_step")
    rows, info = run(args.device, args.quick)
    return report(
        args, "vit_step", f"ViT SSL step (fwd+bwd, 2 views) on {info['device']}", info, rows,
        ["model", "sweep", "img", "batch", "keep", "patch", "tokens", "median_ms", "p20_ms", "p80_ms", "rel_time",
         "peak_mem_gb", "note"],
    )


if __name__ == "__main__":
    main()
