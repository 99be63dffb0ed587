"""patch_embed_gather: our fused kernel against timm's unfused path and torch.compile of it.

Cases: ViT-S/16 (D=384) and ViT-B/16 (D=768) on 3x224x224 images (L = 196 patches), keep ratio
0.25 / 0.5 / 0.75 (K = int(196 * ratio)); batch 256 in bfloat16 on a GPU (all inputs bf16),
batch 8 in float32 on a CPU. Modes: ``fwd`` and ``fwd+bwd`` (gradients of weight, bias and
pos_embed; images need none, as in training). Baseline ``timm path``: conv patch embed ->
flatten/transpose -> + pos_embed -> gather of the kept tokens, in plain torch, and
``torch.compile`` of it (Inductor). FLOPs count the useful work only, 2*N*K*D*C*p*p per forward
GEMM (x2 with the weight-gradient GEMM), for every provider, so a provider that embeds all L
patches shows a lower rate. The limit is the device's bf16 tensor-core rate for bf16 on a GPU (a
bf16 GEMM measured there, ``bf16_tflops_limit``; the spec-sheet table below where measuring
failed), else bench/common.py's FP32 limit.

    python -m bench.bench_patch_embed_gather [--device cuda|cpu] [--out DIR] [--quick]
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from effssl_kernels.ops.patch_embed_gather import patch_embed_gather
from effssl_kernels.reference.gather_tokens import patch_embed_gather_reference

from .common import (CaseRows, check_output, device_info, fmt_limit, live_rows, parse_args, pct_of, report,
                     time_ms, tiny)

MODELS = [("ViT-S/16", 384), ("ViT-B/16", 768)]
RATIOS = [0.5, 0.25, 0.75]  # issue 4's keep 0.5 first: a run cut at its time limit has it
IMG, PATCH, CHANNELS = 224, 16, 3
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's spec sheets.
_BF16_PEAK = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def timm_path(images, weight, bias, keep, pos):
    """timm's unfused order: conv patch embed -> flatten/transpose -> + pos -> gather."""
    x = F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = x + pos
    return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _limit(info: dict, device: str, dtype: torch.dtype) -> tuple[float, str]:
    if device == "cuda" and dtype == torch.bfloat16:
        if info.get("bf16_tflops_limit"):
            return info["bf16_tflops_limit"], "bf16 GEMM measured on this GPU"
        peak = next((v for k, v in _BF16_PEAK.items() if k in info["device"]), None)
        if peak is not None:
            return peak, "bf16 dense tensor-core peak (spec sheet)"
        return info["fp32_tflops_limit"], "no bf16 peak known for this device: FP32 limit"
    return info["fp32_tflops_limit"], f"FP32 limit ({info['limit_source']})"


def run(device: str, quick: bool = False):
    info = device_info(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    limit, limit_src = _limit(info, device, dtype)
    info.update({"dtype": str(dtype), "tflops_limit": limit, "tflops_limit_source": limit_src,
                 "tflops_counts": "the kept patches' GEMMs, for every provider"})
    N = 256 if device == "cuda" else (2 if tiny() else 4 if quick else 8)
    L = (IMG // PATCH) ** 2
    rows = live_rows()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(N, CHANNELS, IMG, IMG, generator=g).to(device, dtype)
    for model, D in MODELS[:1] if tiny() else MODELS:
        weight = (0.02 * torch.randn(D, CHANNELS, PATCH, PATCH, generator=g)).to(device, dtype)
        bias = torch.zeros(D).to(device, dtype)
        pos = (0.02 * torch.randn(1, L, D, generator=g)).to(device, dtype)
        for ratio in (RATIOS[:1] if quick else RATIOS):
            K = max(1, int(L * ratio))
            keep = torch.argsort(torch.rand(N, L, generator=g), dim=1)[:, :K].sort(1).values.to(device)
            gemm_flop = 2 * N * K * D * CHANNELS * PATCH * PATCH
            for mode in ("fwd", "fwd+bwd"):
                # A fresh compile per case: one compiled function over all 12 cases would pass
                # Dynamo's recompile limit (8) and silently time the eager code for the rest.
                torch._dynamo.reset()
                compiled = torch.compile(timm_path, dynamic=False)
                params = [t.detach().requires_grad_(mode == "fwd+bwd") for t in (weight, bias, pos)]
                case_rows, times = CaseRows(rows), {}
                for prov, fn in (("ours", patch_embed_gather), ("timm path (torch)", timm_path),
                                 ("torch.compile(timm path)", compiled)):
                    def call(fn=fn):
                        out = fn(images, params[0], params[1], keep, params[2])
                        if mode == "fwd+bwd":
                            torch.autograd.grad(out, params, torch.ones_like(out))
                        return out

                    row = {"case": f"{model} keep {ratio}", "N": N, "K": K, "D": D, "mode": mode, "provider": prov}
                    try:
                        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                            call()  # warm-up, compile
                            t = time_ms(call, device, min_run_time=0.3 if quick else 1.0)
                    except Exception as e:  # report, never hide, a provider that fails
                        case_rows.append({**row, "note": f"failed: {e}"[:120]})
                        continue
                    flop = gemm_flop * (2 if mode == "fwd+bwd" else 1)
                    tflops = flop / (t["median_ms"] * 1e-3) / 1e12
                    times[prov] = t["median_ms"]
                    row = {**row, **t, "tflops": tflops, "pct_limit": pct_of(tflops, limit)}
                    if prov == "ours":  # the timed shape's answer against the reference in float32
                        with torch.no_grad():
                            got = fn(images, params[0], params[1], keep, params[2])
                            want = patch_embed_gather_reference(images.float(), weight.float(), bias.float(), keep,
                                                                pos.float())
                        check_output(row, got, want, 1e-2 if dtype == torch.bfloat16 else 1e-4)
                    case_rows.append(row)
                for row in case_rows:
                    if row["provider"] == "ours" and "median_ms" in row:
                        for base, key in (("timm path (torch)", "speedup_vs_torch"),
                                          ("torch.compile(timm path)", "speedup_vs_compile")):
                            if base in times:
                                row[key] = times[base] / row["median_ms"]
    return rows, info


def main(argv=None) -> str:
    args = parse_args(__doc__, "keep ratio 0.5 only, smaller CPU batch", argv, name="patch_embed_gather")
    rows, info = run(args.device, args.quick)
    return report(
        args, "patch_embed_gather",
        f"patch_embed_gather on {info['device']}, {info['dtype']} "
        f"(limit {fmt_limit(info['tflops_limit'])} TFLOP/s: {info['tflops_limit_source']}; tflops: the kept "
        "patches' GEMMs / time, for every provider)",
        info, rows,
        ["case", "N", "K", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "speedup_vs_torch",
         "speedup_vs_compile", "tflops", "pct_limit", "max_err", "note"],
    )


if __name__ == "__main__":
    main()
