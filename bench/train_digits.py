"""A short real SimSiam training run, dense against SimWnW: does SimWnW still learn, and at what cost?

What it shows: two SimSiam runs on scikit-learn's bundled digits (1,797 real 8 x 8 handwritten
digits, no download), from the same initial weights, the same batches, the same crops and flips
and the same photometric draws, for the same number of steps:

- ``dense``: the plain (unconverted) CIFAR-style ResNet-18 on both views;
- ``simwnw``: ``ek.SimWnW(block_size=4, threshold_db=20.0)``: each step the block search between
  the two raw views (both directions, centred by the recorded crops), then the
  ``ek.sparsify``'d copy of the same network runs each view with its mask (``SimWnW.encode``).

Logged per step: loss, wall time of the whole step (views + block search + forward + backward +
optimizer; ``torch.cuda.synchronize`` around it on a GPU) and, for simwnw, the fraction of blocks
removed per view. Every ``--eval-every`` steps and at the end: kNN accuracy (k = 20, cosine
similarity of L2-normalised backbone features, votes weighted by exp(sim / 0.07) as in the usual
SSL kNN monitor) of the held-out digits against the training digits, the backbone in eval mode
and dense (the sparsified model outside any ``ek.block_mask`` runs its original forward), plus
the random-init network (step 0) as the baseline. The two runs are stepped alternately, so both
see the same machine load (this box is shared) and a ``--minutes`` guard stops both at the same
step.

Data: ``load_digits()`` pixels 0..16 -> uint8 ``round(v * 255 / 16)``, upscaled to 32 x 32 by
bilinear interpolation (align_corners=False; antialias is irrelevant when upsampling, so off),
gray repeated to 3 channels, kept on the device as uint8. Split: 497 held-out digits, stratified
by class, ``random_state=0``; 1,300 for training (and the kNN memory bank).
Views: ``ek.random_resized_boxes(N, 2, (32, 32), scale=(0.2, 1.0))`` + ``ek.multi_crop`` (the
dense run) or the same boxes through ``SimWnW.views`` (simwnw; same generator stream), then a
per-view brightness/contrast jitter (factors uniform in [0.6, 1.4], tensor ops) and normalisation
by the training pixels' mean/std. No colour jitter / grayscale: the digits are gray.
Model: torchvision ``ResNet(BasicBlock, [2, 2, 2, 2])`` with a 3x3 stride-1 conv1, no max pool,
no fc; on the CPU at a reduced width (base channels ``--width``, torchvision's own blocks rebuilt
narrower) to fit the time budget. SimSiam head: projector feat -> 512 -> 512 (BN, ReLU; BN on the
output), predictor 512 -> 128 -> 512, symmetric negative cosine with stop-gradient. SGD momentum
0.9, weight decay 5e-4, lr ``--base-lr * batch / 256`` with a cosine schedule over the planned
steps (base 0.05, SimSiam's rule). fp32 on the CPU; bf16 autocast on a GPU.

    python -m bench.train_digits [--device cpu|cuda] [--steps N] [--out DIR] [--minutes M]

CPU defaults (2-core shared box): width 16, batch 128, 300 steps, base lr 0.5 (lr 0.25), kNN
every 50 steps, a 14-minute guard; both runs and the 14 evaluations (7 per run, step 0 included)
took 9.6 minutes wall. GPU defaults: width 64 (the real ResNet-18), batch 256, 2000 steps, base
lr 0.05, kNN every 400, no guard. Writes ``results.json`` and ``curves.png`` to ``--out`` (default
``bench/results/<cpu|gpu>/digits_simsiam/``) and prints a summary table.

What the CPU run found (bench/results/cpu/digits_simsiam/, one seed): both runs drive the SimSiam
loss from 0 to about -0.55 (dense -0.58, simwnw -0.53 over the last 30 steps) while SimWnW removes
70% of each view's blocks (mostly the digits' flat black background: identical blocks match at
infinite PSNR); kNN at step 300 is 0.79 dense, 0.85 simwnw, but both are below the random-init
network's 0.89: on these tiny digits random conv features are already strong (raw-pixel kNN is
0.97) and 300 SimSiam steps lower kNN in every setting tried (lr, width 8-32, crop scale). So
the run shows SimWnW trains as well as dense here, not that 300 steps of SSL beat random
features. CPU step times are a sanity check only (simwnw 1.07x dense): SimWnW's tile kernels
are meant for the GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import effssl_kernels as ek

from .common import RESULTS, add_device_arg, check_device, device_info, int_at_least

# CPU: picked by timing a few steps on the 2-core box (~0.7 s per step per run at width 16, batch
# 128) so both runs and the evaluations fit 15 minutes; base_lr 0.5 because SimSiam's 0.05 barely
# moves in 300 steps (a 200-step dense sweep of 0.05 / 0.2 / 0.5 / 1.0 gave the best kNN at 0.5),
# and a 14-minute guard because the box is shared and step times can double under load.
# GPU: the real ResNet-18 and SimSiam's lr rule; 2000 steps is ~400 epochs of the 1,300 digits.
CPU_DEFAULTS = {"width": 16, "batch": 128, "steps": 300, "eval_every": 50, "base_lr": 0.5, "minutes": 14.0}
GPU_DEFAULTS = {"width": 64, "batch": 256, "steps": 2000, "eval_every": 400, "base_lr": 0.05, "minutes": None}
VIEW = 32  # view side = image side (CIFAR-like)
BLOCK = 4  # SimWnW block at 32 px: divides the view and the strides 1, 2, 4 of layers 1-3
SCALE = (0.2, 1.0)
TEST_SIZE = 497
KNN_K, KNN_T = 20, 0.07


# ----------------------------------------------------------------------------- data
def load_digits_uint8(device, seed: int = 0):
    """Digits as uint8 ``[N, 3, 32, 32]`` on ``device``: a stratified, seeded train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images).float().mul_(255 / 16).round_()  # [N, 8, 8], 0..255
    # Upsampling: antialias would make no difference, so plain bilinear (align_corners=False).
    x = F.interpolate(x[:, None], size=(VIEW, VIEW), mode="bilinear", align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    tr, te = train_test_split(torch.arange(len(y)).numpy(), test_size=TEST_SIZE, stratify=y.numpy(),
                              random_state=seed)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device)


class Sampler:
    """Epochs of shuffled, drop-last batches from a seeded CPU generator (same order in both runs)."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.g = n, batch, torch.Generator().manual_seed(seed)
        self.perm, self.pos = None, n

    def next(self) -> Tensor:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx


class Photometric:
    """Per-image brightness and contrast jitter (factors uniform in [1 - s, 1 + s], drawn on the
    CPU from the run's generator so both runs get the same draws), then normalisation. Tensor ops
    only: cheap on any device. Applied per view, after SimWnW matched the raw views."""

    def __init__(self, mean: float, std: float, generator: torch.Generator, strength: float = 0.4):
        self.mean, self.std, self.g, self.s = mean, std, generator, strength

    def __call__(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        f = torch.empty(2, n, 1, 1, 1).uniform_(1 - self.s, 1 + self.s, generator=self.g).to(x.device)
        x = x * f[0]  # brightness
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - m) * f[1] + m).clamp_(0, 1)  # contrast around each image's mean grey
        return (x - self.mean) / self.std


# ----------------------------------------------------------------------------- model
def cifar_resnet18(width: int = 64) -> nn.Module:
    """torchvision's ResNet-18 made CIFAR-style (3x3 stride-1 conv1, no max pool, no fc), with
    ``width`` base channels (64 = the real ResNet-18); features ``8 * width``."""
    from torchvision.models.resnet import BasicBlock, ResNet

    m = ResNet(BasicBlock, [2, 2, 2, 2])
    if width != 64:  # torchvision hard-codes 64: rebuild its own layers narrower with _make_layer
        m.inplanes = width
        m.bn1 = nn.BatchNorm2d(width)
        m.layer1 = m._make_layer(BasicBlock, width, 2)
        m.layer2 = m._make_layer(BasicBlock, 2 * width, 2, stride=2)
        m.layer3 = m._make_layer(BasicBlock, 4 * width, 2, stride=2)
        m.layer4 = m._make_layer(BasicBlock, 8 * width, 2, stride=2)
    m.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    m.fc = nn.Identity()
    for mod in m.modules():  # torchvision's init, for the replaced layers too
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
    return m


class SimSiam(nn.Module):
    """Backbone + projector (feat -> 512 -> 512, BN) + predictor (512 -> 128 -> 512)."""

    def __init__(self, width: int, dim: int = 512, pred: int = 128):
        super().__init__()
        self.backbone = cifar_resnet18(width)
        feat = 8 * width
        self.projector = nn.Sequential(
            nn.Linear(feat, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim))
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred, bias=False), nn.BatchNorm1d(pred), nn.ReLU(inplace=True),
            nn.Linear(pred, dim))

    def head_loss(self, fa: Tensor, fb: Tensor) -> Tensor:
        za, zb = self.projector(fa), self.projector(fb)
        pa, pb = self.predictor(za), self.predictor(zb)
        return -0.5 * (F.cosine_similarity(pa, zb.detach()).mean() + F.cosine_similarity(pb, za.detach()).mean())


# ----------------------------------------------------------------------------- one run
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class Run:
    """One training run: its model, optimizer, generators and logs. ``sw`` None = dense."""

    def __init__(self, name, model, sw, cfg, data, mean, std):
        self.name, self.model, self.sw, self.cfg = name, model, sw, cfg
        self.x_train = data[0]
        self.device = cfg["device"]
        # Same seeds in both runs: same batches, crops, flips and photometric draws.
        self.sampler = Sampler(len(self.x_train), cfg["batch"], cfg["seed"])
        self.g = torch.Generator().manual_seed(cfg["seed"] + 1)
        self.photo = Photometric(mean, std, self.g)
        self.base_lr = cfg["base_lr"] * cfg["batch"] / 256
        self.opt = torch.optim.SGD(model.parameters(), lr=self.base_lr, momentum=0.9, weight_decay=5e-4)
        self.losses, self.times, self.lrs, self.evals = [], [], [], []
        self.view_checksum = None
        self.fmt = torch.channels_last if self.device == "cuda" else torch.contiguous_format

    def _views(self, images):
        if self.sw is not None:
            v = self.sw.views(images, VIEW, scale=SCALE, photometric=self.photo, generator=self.g)
            return v.view_a, v.view_b, v.masks
        # The same calls SimWnW.views makes (same generator stream), without the block search.
        v, _, _ = ek.random_crops(images, 2, VIEW, scale=SCALE, generator=self.g)
        return self.photo(v[:, 0]), self.photo(v[:, 1]), None

    def step(self, step: int, total: int) -> None:
        lr = self.base_lr * 0.5 * (1 + math.cos(math.pi * step / total))
        for group in self.opt.param_groups:
            group["lr"] = lr
        images = self.x_train[self.sampler.next().to(self.device)]
        _sync(self.device)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        va, vb, masks = self._views(images)
        va, vb = va.contiguous(memory_format=self.fmt), vb.contiguous(memory_format=self.fmt)
        if self.view_checksum is None:  # proves both runs saw the same first views
            self.view_checksum = float(va.double().sum() + 2 * vb.double().sum())
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            if masks is None:
                fa, fb = self.model.backbone(va), self.model.backbone(vb)
            else:
                fa, fb = self.sw.encode(self.model.backbone, va, vb, masks)
            loss = self.model.head_loss(fa.float(), fb.float())
        loss.backward()
        self.opt.step()
        _sync(self.device)
        self.times.append(time.perf_counter() - t0)
        self.losses.append(loss.detach())  # read at the end / for the progress bar: no extra sync
        self.lrs.append(lr)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def features(backbone: nn.Module, x_uint8: Tensor, mean, std, device, chunk: int = 512) -> Tensor:
    out = []
    fmt = torch.channels_last if device == "cuda" else torch.contiguous_format
    for i in range(0, len(x_uint8), chunk):
        x = ((x_uint8[i:i + chunk].float() / 255 - mean) / std).contiguous(memory_format=fmt)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out.append(backbone(x).float())
    return F.normalize(torch.cat(out), dim=1)


@torch.no_grad()
def knn_accuracy(model: SimSiam, data, mean, std, device) -> float:
    """Weighted kNN (k = 20, cosine, exp(sim / 0.07) votes) of the test split against the train
    split, backbone in eval mode. A sparsified backbone outside ``ek.block_mask`` is the dense
    network, so both runs are evaluated the same way."""
    x_tr, y_tr, x_te, y_te = data
    was_training = model.training
    model.eval()
    try:
        f_tr = features(model.backbone, x_tr, mean, std, device)
        f_te = features(model.backbone, x_te, mean, std, device)
    finally:
        model.train(was_training)
    sim = f_te @ f_tr.T
    w, idx = sim.topk(KNN_K, dim=1)
    votes = torch.zeros(len(x_te), 10, device=sim.device)
    votes.scatter_add_(1, y_tr[idx], (w / KNN_T).exp())
    return (votes.argmax(1) == y_te).float().mean().item()


# ----------------------------------------------------------------------------- plot, table
def plot(path: str, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, color in (("dense", "C0"), ("simwnw", "C1")):
        r = res["runs"][name]
        steps = range(1, len(r["loss"]) + 1)
        ax[0].plot(steps, r["loss"], color=color, alpha=0.25, lw=0.8)
        k = max(1, len(r["loss"]) // 30)  # moving average: the per-step loss is noisy
        sm = [statistics.fmean(r["loss"][max(0, i - k + 1):i + 1]) for i in range(len(r["loss"]))]
        ax[0].plot(steps, sm, color=color, label=f"{name} (moving avg {k})")
        ax[1].plot([e["step"] for e in r["evals"]], [e["knn_acc"] for e in r["evals"]], marker="o",
                   color=color, label=name)
    ax[1].axhline(res["random_init_knn"], color="gray", ls="--", label="random init")
    rem = res["runs"]["simwnw"]["removal_per_step"]
    ax[2].plot(range(1, len(rem) + 1), [100 * (a + b) / 2 for a, b in rem], color="C1", lw=0.8)
    ax[0].set(xlabel="step", ylabel="SimSiam loss", title="training loss")
    ax[1].set(xlabel="step", ylabel="kNN top-1 (held-out)", title=f"kNN accuracy (k={KNN_K})")
    ax[2].set(xlabel="step", ylabel="% blocks removed (mean of both views)",
              title=f"SimWnW removal (block {BLOCK}, {res['config']['threshold_db']} dB)")
    for a in ax[:2]:
        a.legend()
    c = res["config"]
    fig.suptitle(f"SimSiam on sklearn digits: ResNet-18 width {c['width']}, batch {c['batch']}, "
                 f"{res['steps_done']} steps, {res['device_info']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(res: dict) -> list[dict]:
    d, s = res["runs"]["dense"], res["runs"]["simwnw"]
    rows = [
        {"run": "random init", "knn_acc": res["random_init_knn"]},
        {"run": "dense", "knn_acc": d["final_knn"], "final_loss": d["final_loss_avg"],
         "median_step_ms": d["median_step_ms"]},
        {"run": "simwnw", "knn_acc": s["final_knn"], "final_loss": s["final_loss_avg"],
         "median_step_ms": s["median_step_ms"], "step_ratio": s["median_step_ms"] / d["median_step_ms"],
         "removal": s["mean_removal"]},
    ]
    return rows


def print_summary(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SimSiam on digits, {res['steps_done']} steps, {res['device_info']['device']}")
    cols = ["run", "knn_acc", "final_loss", "median_step_ms", "step_ratio", "removal"]
    for c in cols:
        t.add_column(c, justify="left" if c == "run" else "right")
    for r in summary(res):
        t.add_row(*[("-" if r.get(c) is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])))
                    for c in cols])
    Console(width=160).print(t)
    print("step_ratio = simwnw median step / dense median step (whole step incl. block search); "
          "removal = mean fraction of blocks removed per view; final_loss = mean of the last 10% of steps")


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arg(ap)
    ap.add_argument("--steps", type=int_at_least(1), default=None, help="training steps per run (default: device's)")
    ap.add_argument("--batch", type=int_at_least(2), default=None,
                    help="images per step, at least 2 for BatchNorm (default: device's)")
    ap.add_argument("--width", type=int_at_least(1), default=None, help="ResNet-18 base channels (64 = real ResNet-18)")
    ap.add_argument("--eval-every", type=int_at_least(1), default=None, help="steps between kNN evaluations")
    ap.add_argument("--base-lr", type=float, default=None, help="lr = base_lr * batch / 256 (default: device's)")
    ap.add_argument("--threshold-db", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock guard for everything: both runs stop at the same step "
                         "(default: 14 on the CPU, none on a GPU; 0 = none)")
    ap.add_argument("--out", default=None, help="default bench/results/<cpu|gpu>/digits_simsiam/")
    args = ap.parse_args(argv)
    check_device(ap, args)
    if args.base_lr is not None and not (math.isfinite(args.base_lr) and args.base_lr > 0):
        ap.error(f"--base-lr must be a finite number > 0, got {args.base_lr}")
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes >= 0):
        ap.error(f"--minutes must be a finite number >= 0, got {args.minutes}")
    device = args.device
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    cfg = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in defaults.items()}
    minutes = cfg.pop("minutes") or None  # 0 = no guard
    cfg.update(device=device, seed=args.seed, threshold_db=args.threshold_db,
               block_size=BLOCK, view=VIEW, scale=list(SCALE), test_size=TEST_SIZE, knn_k=KNN_K, knn_t=KNN_T,
               minutes=minutes, lr=cfg["base_lr"] * cfg["batch"] / 256, momentum=0.9, weight_decay=5e-4,
               schedule="cosine over planned steps, no warmup", amp="bf16 autocast" if device == "cuda" else "fp32",
               photometric="brightness and contrast x U[0.6, 1.4] per image, then normalise",
               upscale="8x8 -> 32x32 bilinear, align_corners=False, no antialias (upsampling)")
    out = args.out or os.path.join(RESULTS, "gpu" if device == "cuda" else "cpu", "digits_simsiam")
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()

    from tqdm import tqdm

    data = load_digits_uint8(device, args.seed)
    px = data[0].float() / 255
    mean, std = px.mean().item(), px.std().item()  # grey: one mean/std for all channels
    cfg.update(n_train=len(data[0]), n_test=len(data[2]), pixel_mean=mean, pixel_std=std)

    torch.manual_seed(args.seed)
    fmt = torch.channels_last if device == "cuda" else torch.contiguous_format
    dense = SimSiam(cfg["width"]).to(device, memory_format=fmt).train()
    sparse = copy.deepcopy(dense)  # identical initial weights
    ek.sparsify(sparse.backbone, torch.zeros(2, 3, VIEW, VIEW, device=device))
    sw = ek.SimWnW(block_size=BLOCK, threshold_db=args.threshold_db)
    cfg["tile_plan"] = ek.tile_plan(sparse.backbone, BLOCK, (VIEW, VIEW))
    runs = {"dense": Run("dense", dense, None, cfg, data, mean, std),
            "simwnw": Run("simwnw", sparse, sw, cfg, data, mean, std)}

    # Step 0 = the random-init baseline; both copies are evaluated, which also checks that the
    # sparsified copy outside block_mask is the dense network.
    t0 = time.perf_counter()
    for r in runs.values():
        r.evals.append({"step": 0, "knn_acc": knn_accuracy(r.model, data, mean, std, device)})
    eval_s = (time.perf_counter() - t0) / 2  # one evaluation of one model: budgets the guard
    random_knn = runs["dense"].evals[0]["knn_acc"]

    total, done, stopped_early = cfg["steps"], 0, False
    bar = tqdm(range(total), desc="dense+simwnw", unit="step", dynamic_ncols=True)
    for step in bar:
        if minutes is not None:
            # Leave room for the final evaluation of both runs and one more step of each.
            spent = time.perf_counter() - t_start
            step_s = sum(r.times[-1] for r in runs.values()) if done else 0.0
            if spent + step_s + 2.5 * eval_s > 60 * minutes:
                stopped_early = True
                break
        for r in runs.values():  # alternate: both runs see the same machine load
            r.step(step, total)
        done = step + 1
        if done % cfg["eval_every"] == 0 or done == total:
            for r in runs.values():
                t0 = time.perf_counter()
                r.evals.append({"step": done, "knn_acc": knn_accuracy(r.model, data, mean, std, device)})
                eval_s = max(eval_s, time.perf_counter() - t0)
            bar.set_postfix({n: f"loss {r.losses[-1].item():.3f} knn {r.evals[-1]['knn_acc']:.3f}"
                             for n, r in runs.items()})
    bar.close()
    if runs["dense"].evals[-1]["step"] != done:
        for r in runs.values():  # the guard stopped between evaluations: evaluate where it stopped
            r.evals.append({"step": done, "knn_acc": knn_accuracy(r.model, data, mean, std, device)})

    removal = sw.removal_log()
    res = {"config": cfg, "device_info": device_info(device), "steps_done": done,
           "stopped_by_minutes_guard": stopped_early, "random_init_knn": random_knn,
           "same_first_views": runs["dense"].view_checksum == runs["simwnw"].view_checksum,
           "runs": {}}
    for name, r in runs.items():
        losses = torch.stack(r.losses).tolist() if r.losses else []
        tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
        res["runs"][name] = {
            "loss": losses, "step_s": r.times, "lr": r.lrs, "evals": r.evals,
            "final_knn": r.evals[-1]["knn_acc"],
            "final_loss_avg": statistics.fmean(tail),
            # the first steps include one-off allocation / kernel warm-up: skip them
            "median_step_ms": 1e3 * statistics.median(r.times[5:] or r.times or [float("nan")]),
            "total_train_s": sum(r.times),
        }
    res["runs"]["simwnw"]["removal_per_step"] = removal
    res["runs"]["simwnw"]["mean_removal"] = statistics.fmean((a + b) / 2 for a, b in removal) if removal else None
    res["wall_s"] = time.perf_counter() - t_start
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(os.path.join(out, "curves.png"), res)
    print_summary(res)
    print(f"wall {res['wall_s'] / 60:.1f} min; wrote {out}/results.json and curves.png")
    return res


if __name__ == "__main__":
    main()
