"""AAIP acceleration schedule in a small MoCo-v3 run: the same steps with and without it.

MoCo v3 (online ViT + projector + predictor, momentum ViT + projector by EMA, symmetric InfoNCE at
temperature 0.2; BN-free MLP heads, as in the ViT variant of MoCo v3 here; with BatchNorm the
schedule restores the running statistics after its probes, see ``estimate``'s ``modules``) on
two RandomResizedCrop + flip views (``ek.random_resized_boxes`` + ``ek.multi_crop``) of random
regions of the bundled photographs (bench/real_images.py).

- ``baseline``: every step uncompressed (keep 1.0 at the model's patch).
- ``schedule``: ``ek.AccelerationSchedule`` over keeps x patches, estimated at 0 / 25 / 50 / 75 %
  of the steps from fresh batches of the same stream (``ref_batches`` for the reference,
  ``probe_batches`` per candidate); the online encoder runs the chosen (keep, patch), the
  momentum encoder the default ``same_patch`` policy (all tokens, same patch size).

Both runs start from the same weights and see the same training batches. Per stage: the setting,
median step time (forward + backward + AdamW + EMA; host timer with CUDA syncs), mean training
loss (of the compressed step under the schedule), and the uncompressed loss on a fixed held-out
batch at the end of the stage (``eval_loss``: comparable across runs). ``estimate_s`` is the
time the schedule spent estimating at the stage's checkpoint (not in ``step_ms``); ``elapsed_s``
the training time to the end of the stage, estimates included (compare eval losses at equal
time as well as at equal steps: AAIP's claim is about equal budget).

CPU: ViT (depth 3, width 192, 3 heads) at 96 px, patches 16/24/32 (grids 6/4/3), keeps
1/0.5/0.25, batch 32, probe batch 16 (``variance_scale`` 0.5), MLP width 512, 120 steps; fp32,
``multiple_of=1``. On a shared CPU pass ``--threads 1``: with another busy process, two OpenMP
threads made every op tens of times slower here. GPU: ViT-S/16 at 224 px, patches 16/28/32
(grids 14/8/7), keeps 1/0.75/0.5/0.25, batch 128, MLP width 4096, 400 steps, bf16 autocast. Either way a tiny run: it shows the mechanics and the step-time
saving, not AAIP's accuracy at equal budget.

    python -m bench.demo_schedule [--device cpu|cuda] [--steps N] [--threads T] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import effssl_kernels as ek

from .common import add_device_arg, check_device, device_info, int_at_least, print_table, results_dir
from .real_images import photo_batch

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

CONFIGS = {
    "cpu": dict(arch="vit_small_patch16_224", img=96, vit_kw=dict(depth=3, embed_dim=192, num_heads=3),
                keeps=[1.0, 0.5, 0.25], patches=[16, 24, 32], batch=32, probe_batch=16, steps=120, hidden=512,
                ref_batches=8, probe_batches=4, multiple_of=1, amp=False, lr=5e-4, source=(128, 160)),
    "cuda": dict(arch="vit_small_patch16_224", img=224, vit_kw={}, keeps=[1.0, 0.75, 0.5, 0.25],
                 patches=[16, 28, 32], batch=128, probe_batch=128, steps=400, hidden=4096, ref_batches=8, probe_batches=4,
                 multiple_of=8, amp=True, lr=1.5e-4 * 128 / 256 * 4, source=(256, 320)),
}


def _mlp(dim_in, hidden, dim_out):
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


class MoCoV3(nn.Module):
    def __init__(self, encoder: nn.Module, dim: int, hidden: int = 4096, out: int = 256, t: float = 0.2):
        super().__init__()
        self.encoder = encoder
        self.projector = _mlp(dim, hidden, out)
        self.predictor = _mlp(out, hidden, out)
        self.m_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.m_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.t = t

    def online_params(self):
        return [*self.encoder.parameters(), *self.projector.parameters(), *self.predictor.parameters()]

    def _ctr(self, q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = q @ k.T / self.t
        return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device)) * 2 * self.t

    def loss(self, v1, v2):
        q1 = self.predictor(self.projector(self.encoder(v1)))
        q2 = self.predictor(self.projector(self.encoder(v2)))
        with torch.no_grad():
            k1 = self.m_projector(self.m_encoder(v1))
            k2 = self.m_projector(self.m_encoder(v2))
        return self._ctr(q1, k2) + self._ctr(q2, k1)

    @torch.no_grad()
    def ema(self, m: float = 0.99):
        for dst, src in ((self.m_encoder, self.encoder), (self.m_projector, self.projector)):
            for pd, ps in zip(dst.parameters(), src.parameters()):
                pd.mul_(m).add_(ps.detach(), alpha=1 - m)


class Views:
    """Two views per sample: a random region of a random photograph, then RandomResizedCrop + flip."""

    def __init__(self, device, img, source, seed):
        self.pool = photo_batch(8, source, device)
        self.img, self.device = img, device
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, n):
        H, W = self.pool.shape[-2:]
        idx = torch.randint(len(self.pool), (n,), generator=self.gen).to(self.device)
        base_boxes, _ = ek.random_resized_boxes(n, 1, (H, W), scale=(0.15, 0.6), hflip_p=0.0, generator=self.gen,
                                                device=self.device)
        base = ek.multi_crop(self.pool[idx], base_boxes, None, (H // 2, W // 2))  # uint8 [n, 3, H/2, W/2]
        v, _, _ = ek.random_crops(base, 2, self.img, scale=(0.2, 1.0), generator=self.gen)
        v = (v - MEAN.to(v.device)) / STD.to(v.device)
        return v[:, 0].contiguous(), v[:, 1].contiguous()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def train(cfg, device, steps, use_schedule: bool, init_state):
    import timm

    enc = ek.sparsify_vit(timm.create_model(cfg["arch"], img_size=cfg["img"], num_classes=0, **cfg["vit_kw"]))
    model = MoCoV3(enc, enc.embed_dim, cfg["hidden"]).to(device)
    model.load_state_dict(init_state)
    model.train()
    opt = torch.optim.AdamW(model.online_params(), lr=cfg["lr"], weight_decay=0.05)
    data = Views(device, cfg["img"], cfg["source"], seed=1)
    probe_data = Views(device, cfg["img"], cfg["source"], seed=2)  # the estimates do not shift `data`
    held_out = Views(device, cfg["img"], cfg["source"], seed=3)(cfg["batch"])
    amp = cfg["amp"] and device == "cuda"
    tok_gen = torch.Generator(device=device).manual_seed(4)

    sched = ek.AccelerationSchedule(
        keeps=cfg["keeps"], patches=cfg["patches"], total_steps=steps, ref_batches=cfg["ref_batches"],
        probe_batches=cfg["probe_batches"], variance_scale=cfg["probe_batch"] / cfg["batch"],
        multiple_of=cfg["multiple_of"])

    def step_loss(views):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            return model.loss(*views)

    probe_loss = sched.vit_loss_fn(model.encoder, step_loss, momentum=model.m_encoder, generator=tok_gen)
    stage_end = sched.checkpoint_steps[1:] + [steps]
    rows, acc, est, elapsed = [], None, 0.0, 0.0
    for step in range(steps):
        if use_schedule and sched.due(step):
            _sync(device)
            t0 = time.perf_counter()
            sched.on_step(step, probe_loss, model.online_params(), lambda: probe_data(cfg["probe_batch"]))
            _sync(device)
            est = time.perf_counter() - t0
            elapsed += est
            acc = None
        if acc is None:
            cfg_on = sched.current if use_schedule else sched.ref
            cfg_mom = sched.momentum_config(cfg_on) if use_schedule else sched.ref
            acc = {"run": "schedule" if use_schedule else "baseline", "stage": len(rows), "from_step": step,
                   "keep": cfg_on.keep, "patch": cfg_on.patch, "momentum": f"{cfg_mom.keep:g}/{cfg_mom.patch}",
                   "times": [], "losses": [], "estimate_s": est}
            est = 0.0
        views = data(cfg["batch"])
        _sync(device)
        t0 = time.perf_counter()
        with sched.apply(model.encoder, "online", config=cfg_on, generator=tok_gen), \
                sched.apply(model.m_encoder, "momentum", config=cfg_mom, generator=tok_gen):
            loss = step_loss(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.ema()
        _sync(device)
        acc["times"].append(time.perf_counter() - t0)
        elapsed += acc["times"][-1]
        acc["losses"].append(float(loss.detach()))
        if step + 1 in stage_end:
            with torch.no_grad():
                ev = float(step_loss(held_out))
            t = sorted(acc.pop("times")[1:])  # the first step of a stage pays warm-up
            ls = acc.pop("losses")
            rows.append({**acc, "steps": step + 1 - acc["from_step"],
                         "step_ms_median": 1e3 * t[len(t) // 2] if t else None,  # a 1-step stage: untimed
                         "train_loss": sum(ls) / len(ls), "eval_loss": ev, "elapsed_s": elapsed})
            acc = None
    return rows, sched


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arg(ap)
    ap.add_argument("--steps", type=int_at_least(4), default=None,
                    help="training steps per run, at least 4: one per checkpoint (default: device's)")
    ap.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<gpu|cpu>)")
    args = ap.parse_args(argv)
    check_device(ap, args)
    import timm

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = {k: v for k, v in CONFIGS[args.device].items() if k != "steps"}  # info's "steps" is the run's
    steps = CONFIGS[args.device]["steps"] if args.steps is None else args.steps
    torch.manual_seed(0)
    enc = ek.sparsify_vit(timm.create_model(cfg["arch"], img_size=cfg["img"], num_classes=0, **cfg["vit_kw"]))
    init_state = copy.deepcopy(MoCoV3(enc, enc.embed_dim, cfg["hidden"]).state_dict())
    t0 = time.perf_counter()
    base_rows, _ = train(cfg, args.device, steps, False, init_state)
    t_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    sched_rows, sched = train(cfg, args.device, steps, True, init_state)
    t_sched = time.perf_counter() - t0
    rows = base_rows + sched_rows
    for r in sched_rows:
        b = base_rows[r["stage"]]
        if r["step_ms_median"] and b["step_ms_median"]:
            r["rel_step_time"] = r["step_ms_median"] / b["step_ms_median"]
    info = device_info(args.device)
    info.update(config={k: v for k, v in cfg.items()}, steps=steps, wall_s={"baseline": t_base, "schedule": t_sched})
    out = args.out or results_dir("gpu" if args.device == "cuda" else "cpu")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "schedule_demo.json")
    with open(path, "w") as f:
        json.dump({"info": info, "rows": rows, "estimates": sched.table()}, f, indent=1, default=str)
    print_table("AAIP CA-MSE estimates (schedule run)", sched.table(),
                ["step", "keep", "patch", "bias2", "variance", "seconds", "cost", "ca_mse", "chosen"])
    print_table(f"MoCo v3 {steps} steps, with and without the schedule, on {info['device']}", rows,
                ["run", "stage", "from_step", "steps", "keep", "patch", "momentum", "step_ms_median",
                 "rel_step_time", "train_loss", "eval_loss", "estimate_s", "elapsed_s"])
    print(f"wall: baseline {t_base:.1f} s, schedule {t_sched:.1f} s (estimates included); wrote {path}")
    return path


if __name__ == "__main__":
    main()
