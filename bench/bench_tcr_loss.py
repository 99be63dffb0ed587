"""tcr_loss: EMP-SSL's total coding rate, ours against the d x d logdet of EMP-SSL's code.

Cases: d = 1024 (EMP-SSL's projection width), one group of b = 64, 128, 256, 512, 1024 rows on a
GPU (b = 64, 256, 1024 on a CPU), plus EMP-SSL's own shape, one call for all patches: its code's
defaults of P = 100 patch groups of b = 100 images on a GPU (``[100, 100, 1024]``), the paper's
20 patches on a CPU. Unit-norm float32 rows. Modes: forward, and
forward+backward (the gradient of z). Providers:

- ours: ``tcr_loss(z, check=False)``: the ``n x n`` Gram (``n = min(b, d)``), Cholesky, closed-form
  backward; ``check=False`` is the no-sync mode of a training step;
- ours (check=True): the default, with its one host sync;
- small-side Cholesky + autograd: the same forward, backward by autograd through
  ``cholesky`` and the Gram matmul (the alternative to our closed-form backward);
- reference (d x d logdet): ``tcr_loss_reference``, i.e. EMP-SSL's ``torch.logdet`` of
  ``I_d + c Z^T Z`` (LU) and its autograd backward.

``gflops`` (forward rows only) counts each algorithm's own forward work per group and sums over
groups: small side ``2 n^2 m + n^3 / 3`` (Gram matmul as a full GEMM, Cholesky), with
``m = max(b, d)``; reference ``2 d^2 b + 2 d^3 / 3`` (Gram matmul, LU). ``pct_fp32_limit`` is that
rate over the device's FP32 limit (an SGEMM measured on the device, TF32 off; the spec sheet's
only where measuring failed). GPU rows also give ``peak_mib``, the peak memory allocated by one call. CPU timings use all cores and are noisy
on a shared machine.

    python -m bench.bench_tcr_loss [--device cuda|cpu] [--out DIR] [--quick]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from effssl_kernels import tcr_loss
from effssl_kernels.reference import tcr_loss_reference

from .common import (CaseRows, device_info, fmt_limit, live_rows, mark_speedups, parse_args, pct_of, report,
                     time_ms, tiny)

D = 1024
EPS = 0.2
SIZES = {"cuda": [64, 128, 256, 512, 1024], "cpu": [64, 256, 1024]}
EMP_SSL = {"cuda": (100, 100), "cpu": (20, 100)}  # patch groups P, batch b


def small_side_autograd(z, eps):
    """The same forward as ours, differentiated by autograd through cholesky and the matmul."""
    b, d = z.shape[-2], z.shape[-1]
    gram = z @ z.mT if b <= d else z.mT @ z
    G = torch.eye(gram.shape[-1], dtype=z.dtype, device=z.device) + d / (b * eps * eps) * gram
    return torch.linalg.cholesky(G).diagonal(dim1=-2, dim2=-1).log().sum(-1)


PROVIDERS = {
    "ours": lambda z: tcr_loss(z, EPS, check=False),
    "ours (check=True)": lambda z: tcr_loss(z, EPS),
    "small-side Cholesky + autograd": lambda z: small_side_autograd(z, EPS),
    "reference (d x d logdet)": lambda z: tcr_loss_reference(z, EPS),
}


def forward_flop(provider: str, P: int, b: int, d: int) -> float:
    if provider.startswith("reference"):
        return P * (2 * d * d * b + 2 * d**3 / 3)
    n, m = min(b, d), max(b, d)
    return P * (2 * n * n * m + n**3 / 3)


def run(device: str, quick: bool = False):
    info = device_info(device)
    info.update(d=D, eps=EPS, dtype="float32")  # in a partial JSON too
    cases = [(f"b={b} d={D}", None, b) for b in SIZES[device]]
    if not quick or tiny():
        P, b = (2, 8) if tiny() else EMP_SSL[device]
        cases.append((f"EMP-SSL P={P} b={b} d={D}", P, b))
    cases = cases[:1] + cases[-1:] if tiny() else cases
    min_run_time = (0.2 if quick else 0.5) if device == "cpu" else 1.0
    rows = live_rows()
    for case, P, b in cases:
        g = torch.Generator().manual_seed(0)
        shape = (b, D) if P is None else (P, b, D)
        z = F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device)
        zg = z.clone().requires_grad_()
        for mode in ("fwd", "fwd+bwd"):
            case_rows = CaseRows(rows)
            for prov, f in PROVIDERS.items():
                if mode == "fwd":
                    def fn(f=f, z=z):
                        return f(z)
                else:
                    def fn(f=f, zg=zg):
                        return torch.autograd.grad(f(zg).sum(), zg)
                row = {"case": case, "mode": mode, "provider": prov}
                try:
                    fn()  # warm-up
                    peak = None
                    if device == "cuda":  # what one call allocates at its peak, beyond z's
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        before = torch.cuda.memory_allocated()
                        fn()
                        torch.cuda.synchronize()
                        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
                    t = time_ms(fn, device, min_run_time=min_run_time)
                except Exception as e:  # noqa: BLE001  (report, never hide, a provider that fails)
                    case_rows.append({**row, "note": f"failed: {e}"[:120]})
                    continue
                row.update(t)
                if peak is not None:
                    row["peak_mib"] = peak
                if mode == "fwd":
                    gflops = forward_flop(prov, P or 1, b, D) / (t["median_ms"] * 1e-3) / 1e9
                    row.update(gflops=gflops, pct_fp32_limit=pct_of(gflops, 1e3 * info["fp32_tflops_limit"]))
                case_rows.append(row)
            mark_speedups(case_rows)
    return rows, info


def main(argv=None) -> str:
    args = parse_args(__doc__, "no EMP-SSL batched case, shorter timing", argv, name="tcr_loss")
    rows, info = run(args.device, args.quick)
    return report(
        args, "tcr_loss",
        f"tcr_loss on {info['device']}, d={D}, float32 (FP32 limit {fmt_limit(info['fp32_tflops_limit'])} TFLOP/s, "
        f"{info['limit_source']}; ours_speedup: provider time / ours, >1 means ours is faster)",
        info, rows,
        ["case", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "ours_speedup", "gflops", "pct_fp32_limit",
         "peak_mib", "note"],
    )


if __name__ == "__main__":
    main()
