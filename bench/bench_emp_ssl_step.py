"""An EMP-SSL training step: patches made on the device by multi_crop vs a CPU data loader.

Step = make ``P`` RandomResizedCrop(32, scale 0.25) + flip patches of each of ``N`` uint8 CIFAR-size
images, embed all ``P * N`` patches with a CIFAR ResNet-18 + EMP-SSL's projector (2-layer MLP to
d = 1024, L2-normalised), ``emp_ssl_loss`` (invariance + total coding rate of the ``P`` groups),
backward; no optimizer step. Providers:

- ``multi_crop``: ``emp_ssl_patches`` (one ``multi_crop`` launch on the images' device);
- ``cpu loader``: what EMP-SSL's loader does, per patch ``torchvision.transforms.v2``
  ``RandomResizedCrop`` + ``RandomHorizontalFlip`` on CPU uint8 tensors, stacked, copied to the
  device and scaled (no worker processes; a DataLoader with workers hides this time only while
  it is shorter than the step);
- ``... (patches only)`` rows time the patch making alone, so the augmentation share of a step is
  ``patches only / step``.

GPU: N = 64 images (1,280 and 12,800 patches), bf16 autocast. CPU: N = 4 and 1 (80 and 200 patches), fp32.

    python -m bench.bench_emp_ssl_step [--device cuda|cpu] [--out DIR] [--quick]
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from effssl_kernels.emp_ssl import emp_ssl_loss, emp_ssl_patches

from .common import CaseRows, device_info, live_rows, mark_speedups, parse_args, report, timed_row, tiny


class EMPModel(nn.Module):
    def __init__(self, d: int = 1024):
        super().__init__()
        r = ResNet(BasicBlock, [2, 2, 2, 2])
        r.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        r.maxpool = nn.Identity()
        r.fc = nn.Identity()
        self.backbone = r
        self.projector = nn.Sequential(nn.Linear(512, 4096), nn.BatchNorm1d(4096), nn.ReLU(), nn.Linear(4096, d))

    def forward(self, x):
        return F.normalize(self.projector(self.backbone(x)), dim=-1)


def cpu_loader_patches(images_cpu: torch.Tensor, P: int, device: str) -> torch.Tensor:
    from torchvision.transforms import v2

    t = v2.Compose([v2.RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1, 1), antialias=False), v2.RandomHorizontalFlip()])
    patches = [t(img) for i in range(P) for img in images_cpu]  # patch-major, as EMP-SSL chunks
    return torch.stack(patches).to(device, non_blocking=True).float().div_(255)


def run(device: str, quick: bool = False):
    info = device_info(device)
    gpu = device == "cuda"
    cases = [(4, 1)] if tiny() else [(20, 64 if gpu else 4), (200, 64 if gpu else 1)]
    torch.manual_seed(0)
    model = EMPModel().to(device).train()
    rows = live_rows()
    for P, N in cases:
        N = max(1, N // (4 if quick else 1))
        images = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8)
        images_dev = images.to(device)
        gen = torch.Generator().manual_seed(0)
        case = f"P={P} N={N} ({P * N} patches)"

        def step(make):
            def fn():
                model.zero_grad(set_to_none=True)
                x = make()
                with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
                    z = model(x)
                loss, _ = emp_ssl_loss(z.float(), P, check=False)
                loss.backward()
            return fn

        def ours():
            return emp_ssl_patches(images_dev, P, 32, generator=gen)

        def loader():
            return cpu_loader_patches(images, P, device)

        fns = {"multi_crop": step(ours), "cpu loader": step(loader),
               "multi_crop (patches only)": ours, "cpu loader (patches only)": loader}
        case_rows = CaseRows(rows)
        for prov, fn in fns.items():
            r = timed_row({"case": case, "provider": prov}, fn, device, 0.3 if quick else 1.0)
            if "median_ms" in r:
                r["patches_per_s"] = P * N / (r["median_ms"] * 1e-3)
            case_rows.append(r)
        by = {r["provider"]: r for r in case_rows if "median_ms" in r}
        for name in ("multi_crop", "cpu loader"):
            if name in by and f"{name} (patches only)" in by:
                by[name]["aug_share"] = by[f"{name} (patches only)"]["median_ms"] / by[name]["median_ms"]
        mark_speedups([r for r in case_rows if "patches only" not in r["provider"]], ours="multi_crop")
        mark_speedups([r for r in case_rows if "patches only" in r["provider"]], ours="multi_crop (patches only)")
    return rows, info


def main(argv=None) -> str:
    args = parse_args(__doc__, "a quarter of the images, shorter timing", argv, name="emp_ssl_step")
    rows, info = run(args.device, args.quick)
    return report(args, "emp_ssl_step", f"EMP-SSL step (CIFAR ResNet-18, d=1024) on {info['device']} "
                  "(ours_speedup: provider time / multi_crop's)", info, rows,
                  ["case", "provider", "median_ms", "p20_ms", "p80_ms", "ours_speedup", "aug_share",
                   "patches_per_s", "note"])


if __name__ == "__main__":
    main()
