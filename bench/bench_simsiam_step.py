"""A SimSiam training step of a block-masked ResNet end to end: how much block removal saves.

Step = forward + backward of two views through one encoder (ResNet + SimSiam's 3-layer projector)
and the predictor, symmetric negative-cosine loss with stop-gradient; gradients are zeroed, no
optimizer step. Each view gets a fresh random mask per step that keeps exactly ``ceil(keep * 49)``
of its 49 blocks (``kept``: 25/49 at keep 0.5; the block search of SimWnW is benchmarked on its
own). Providers:

- ``dense``: the unconverted model (cuDNN on a GPU), no mask: the baseline;
- ``packed``: ``effssl_kernels.sparsify`` + ``block_mask``: maps stay packed (kept tiles only)
  between layers, every layer computes kept tiles only, forward and backward;
- ``per_layer``: the same model with packing off, so every layer packs, computes its tiles and
  unpacks (``sparse_conv2d``'s dense in / dense out; what ``torch.compile`` runs today);
- ``masked_dense``: every layer dense, then masked (``M_out * conv(M_in * x)`` etc.): the cost of
  the masked network without any skipping.

``rel_time`` is the median over dense's and ``speedup`` its inverse. ``ideal_speedup`` is
``1 / (kept * (1 - f) + f)`` with ``f`` the packed step at keep 0 over dense (the share that cannot
shrink), as the issue asks; ``of_ideal = speedup / ideal_speedup`` is how close removal comes to
its own best case. Memory: ``saved_mib`` is what autograd keeps for backward in one step (unique
tensor storages seen by ``saved_tensors_hooks``, parameters excluded; any device), ``rel_saved``
its ratio to dense's; GPU rows add ``peak_mib``, the peak allocated during one step beyond what
was allocated before.

GPU: ResNet-50 at 224 px, block 32, batch 256 per view, bf16 autocast, channels_last,
``cudnn.benchmark`` on for every provider (the shapes are fixed per keep: a user's best). The
stride-1 3x3 convs on tiles run as ``EFFSSL_TILE_CONV`` says (default cuDNN on halo'd tiles;
``EFFSSL_TILE_CONV=implicit python -m bench.bench_simsiam_step`` times the Triton implicit GEMM;
the note column and the JSON's info say which).
CPU: ResNet-18 at 112 px, block 16 (the same 7 x 7 block grid), batch 8, fp32; there layer4
(stride 32 > block 16) is not tile-aligned and runs masked-dense. CPU numbers show overheads,
not the GPU's savings.

    python -m bench.bench_simsiam_step [--device cuda|cpu] [--out DIR] [--quick]
"""
from __future__ import annotations

import contextlib
import copy
import os
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

import effssl_kernels.sparse.conv as sparse_conv_mod
import effssl_kernels.sparse.packed as packed_mod
from effssl_kernels.masks import BlockMask
from effssl_kernels.nn import block_mask, sparsify, tile_plan

from .common import cudnn_benchmark, device_info, kept_count, live_rows, parse_args, report, timed_row, tiny

KEEPS = [1.0, 0.8, 0.75, 0.65, 0.5, 0.25, 0.0]
PROVIDERS = ["dense", "packed", "per_layer", "masked_dense"]


def _mlp(dims, last_bn=True):
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=False))
        if not last or last_bn:
            layers.append(nn.BatchNorm1d(b))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SimSiam(nn.Module):
    """Encoder (backbone + projector) and predictor, as in Chen & He (2021)."""

    def __init__(self, backbone: nn.Module, feat: int, dim: int = 2048, pred: int = 512):
        super().__init__()
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.projector = _mlp([feat, dim, dim, dim])
        self.predictor = _mlp([dim, pred, dim], last_bn=False)

    def loss(self, v1, v2, m1=None, m2=None):
        with block_mask(m1):
            f1 = self.backbone(v1)
        with block_mask(m2):
            f2 = self.backbone(v2)
        return self.head_loss(f1, f2)

    def head_loss(self, f1, f2):
        """Symmetric negative cosine with stop-gradient, from both views' backbone features."""
        z1, z2 = self.projector(f1), self.projector(f2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return -0.5 * (F.cosine_similarity(p1, z2.detach()).mean()
                       + F.cosine_similarity(p2, z1.detach()).mean())


def random_keep(n: int, grid: int, keep: float, gen: torch.Generator, device) -> torch.Tensor:
    """bool ``[n, grid, grid]`` keeping exactly ``kept_count(keep, grid^2)`` random blocks each."""
    k = kept_count(keep, grid * grid)
    order = torch.rand(n, grid * grid, generator=gen, device=device).argsort(1)
    return (order < k).view(n, grid, grid)


@contextlib.contextmanager
def _provider(name: str):
    """packing off (per_layer), or also no tiles at all (masked_dense)."""
    with contextlib.ExitStack() as st:
        if name in ("per_layer", "masked_dense"):
            st.enter_context(mock.patch.object(packed_mod, "packing_enabled", lambda: False))
        if name == "masked_dense":
            st.enter_context(mock.patch.object(sparse_conv_mod, "conv_tile_halo",
                                               lambda *a, **k: None))
        yield


def run(device: str, quick: bool = False):
    import torchvision

    info = device_info(device)
    gpu = device == "cuda"
    arch, feat, img, block, batch = (("resnet50", 2048, 224, 32, 256) if gpu
                                     else ("resnet18", 512, 112, 16, 8))
    if tiny():
        img, batch = 64, 2
    amp = gpu
    fmt = torch.channels_last if gpu else torch.contiguous_format
    torch.manual_seed(0)
    dense = SimSiam(getattr(torchvision.models, arch)(), feat).to(device, memory_format=fmt).train()
    sparse = copy.deepcopy(dense)
    sparsify(sparse.backbone, torch.zeros(2, 3, img, img, device=device))
    plan = tile_plan(sparse.backbone, block, img)
    n_dense = sum(v == "masked-dense" for v in plan.values())
    tile_conv = sparse_conv_mod.tile_conv_choice()
    if tile_conv == "implicit" and not gpu:
        tile_conv = "cudnn (implicit asked: a GPU path)"
    note = (("bf16 autocast, channels_last" if gpu else "fp32")
            + f"; {n_dense}/{len(plan)} modules masked-dense; tile convs: {tile_conv}")
    info["tile_conv"] = tile_conv
    g = torch.Generator(device=device).manual_seed(1)
    v1 = torch.rand(batch, 3, img, img, device=device, generator=g).contiguous(memory_format=fmt)
    v2 = torch.rand(batch, 3, img, img, device=device, generator=g).contiguous(memory_format=fmt)
    grid = img // block

    def step_fn(model, keep, hooks=contextlib.nullcontext):
        def fn():
            model.zero_grad(set_to_none=True)
            m1 = m2 = None
            if keep is not None:  # fresh masks every step, as in training
                m1 = BlockMask(random_keep(batch, grid, keep, g, device), block, img)
                m2 = BlockMask(random_keep(batch, grid, keep, g, device), block, img)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp), hooks():
                loss = model.loss(v1, v2, m1, m2)
            loss.backward()
        return fn

    def memory(model, keep) -> dict:
        """saved_mib of one step (and peak_mib on a GPU)."""
        saved, params = {}, {p.data_ptr() for p in model.parameters()}

        def pack(t):
            if t.numel() and t.data_ptr() not in params:
                saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        step_fn(model, keep, lambda: torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))()
        out = {"saved_mib": sum(saved.values()) / 2**20}
        if gpu:
            fn = step_fn(model, keep)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            out["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        return out

    keeps = [1.0, 0.5, 0.0] if quick else KEEPS
    providers = PROVIDERS[:2] if quick and not tiny() else PROVIDERS  # the smoke run: every path
    rows, base = live_rows(), None
    # Issue 3's targets first (a run cut at its time limit keeps them): dense, packed at keep 0
    # (the fixed share f of the ideal), 0.5, 0.75 and 1.0; then the other keeps and paths.
    first = [k for k in (0.0, 0.5, 0.75, 1.0) if k in keeps and "packed" in providers]
    cases = [("dense", None)] + [("packed", k) for k in first] + [
        (p, k) for k in keeps for p in providers if p != "dense" and not (p == "packed" and k in first)]
    for prov, keep in cases:
        row = {"provider": prov, "arch": arch, "img": img, "block": block, "batch": batch,
               "keep": 1.0 if keep is None else keep,
               "kept": 1.0 if keep is None else kept_count(keep, grid * grid) / grid**2, "note": note}
        model = dense if prov == "dense" else sparse
        with _provider(prov), (cudnn_benchmark() if gpu else contextlib.nullcontext()):
            row = timed_row(row, step_fn(model, keep), device, 0.5 if quick else (2.0 if gpu else 5.0))
            if "median_ms" in row:  # it ran: measure what it keeps for backward too
                row.update(memory(model, keep))
        if "median_ms" in row:
            if prov == "dense":
                base = row["median_ms"]
            if base is not None:  # dense failed: its note says so, and no ratio is made up
                row["rel_time"] = row["median_ms"] / base
        rows.append(row)
        _derive(rows)  # after every case: a run cut short has its ratios too
    return rows, info


def _derive(rows) -> None:
    """speedup, rel_saved, f_fixed_share (packed at keep 0 / dense), ideal_speedup and of_ideal
    on every row, in place, from the rows timed so far."""
    f = next((r["rel_time"] for r in rows if r["provider"] == "packed" and r["keep"] == 0.0
              and "rel_time" in r), None)
    base_saved = next((r["saved_mib"] for r in rows if r["provider"] == "dense" and "saved_mib" in r), None)
    for r in rows:
        if base_saved and "saved_mib" in r:
            r["rel_saved"] = r["saved_mib"] / base_saved
        r["f_fixed_share"] = f
        if "rel_time" in r:
            r["speedup"] = 1.0 / r["rel_time"]
        if f is not None and r["provider"] != "dense":
            r["ideal_speedup"] = 1.0 / (r["kept"] * (1 - f) + f)
            if "speedup" in r:
                r["of_ideal"] = r["speedup"] / r["ideal_speedup"]


def plot(rows, path: str, title: str) -> str | None:
    """Step time against keep ratio per provider (PNG); None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = next((r["median_ms"] for r in rows if r["provider"] == "dense" and "median_ms" in r), None)
    if dense is not None:
        ax.axhline(dense, color="k", ls="--", label="dense")
    for prov in PROVIDERS[1:]:
        pts = sorted((r["keep"], r["median_ms"]) for r in rows
                     if r["provider"] == prov and "median_ms" in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=prov)
    ideal = sorted((r["keep"], dense / r["ideal_speedup"]) for r in rows
                   if r["provider"] == "packed" and "ideal_speedup" in r)
    if ideal and dense is not None:
        ax.plot(*zip(*ideal), ls=":", color="gray", label="ideal: dense x (kept(1-f)+f)")
    ax.set_xlabel("keep ratio")
    ax.set_ylabel("step time (ms, median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> str:
    args = parse_args(__doc__, "keeps 1.0/0.5/0 and packed only, shorter timing", argv, name="simsiam_step")
    rows, info = run(args.device, args.quick)
    title = f"SimSiam step (fwd+bwd, 2 views) on {info['device']}"
    path = report(args, "simsiam_step", title, info, rows,
                  ["provider", "arch", "img", "block", "batch", "keep", "kept", "median_ms", "p20_ms",
                   "p80_ms", "rel_time", "speedup", "ideal_speedup", "of_ideal", "saved_mib", "rel_saved",
                   "peak_mib", "note"])
    png = plot(rows, os.path.splitext(path)[0] + ".png", title)
    if png:
        print("plot:", png)
    return path


if __name__ == "__main__":
    main()
