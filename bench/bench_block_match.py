"""block_match: our kernels against plain PyTorch, torch.compile and the FP32 limit.

Cases (issue 2): 256 view pairs of 3x224x224 at block 32/radius 16 and block 30/radius 15; 512
pairs of 3x32x32 at block 4/radius 4 and 5/5. On a CPU the pair counts shrink so a run takes
minutes. FLOPs are counted in the direct form: 3 per element per candidate (sub, mul, add),
over the candidates that lie inside b; the limit is the device's FP32 (non-tensor) rate, measured
(an SGEMM with TF32 off, ``fp32_tflops_limit``; the spec sheet's beside it in the JSON's info).

    python -m bench.bench_block_match [--device cuda|cpu] [--out DIR] [--quick]
"""
from __future__ import annotations

import functools

import os
from unittest import mock

import torch
import torch.nn.functional as F

import effssl_kernels as ek
from effssl_kernels.reference import block_match_reference, candidate_order
from effssl_kernels.reference.block_match import any_block_inside

from .common import (CaseRows, check_output, device_info, fmt_limit, live_rows, parse_args, pct_of, report,
                     time_ms, tiny)

GPU_CASES = [  # name, pairs, H, block, radius
    ("224px B32 r16", 256, 224, 32, 16),
    ("224px B30 r15", 256, 224, 30, 15),
    ("32px B4 r4", 512, 32, 4, 4),
    ("32px B5 r5", 512, 32, 5, 5),
]
CPU_PAIRS = {224: 4, 32: 64}
COMPILE_MAX_CANDIDATES = 121  # torch.compile unrolls the displacement loop: only small radii


@functools.lru_cache(maxsize=None)
def _offsets(r: int, device: torch.device) -> torch.Tensor:
    """int32 [candidates, 2] (dy, dx) in candidate_order, on the device once (a host copy per call
    would block the host, which the user's loop need not do)."""
    return torch.tensor(list(candidate_order(r)), dtype=torch.int32).to(device)


def shift_loop(a, b, B: int, r: int, data_range: float = 1.0):
    """What a user writes in plain PyTorch for default centres: one pass per displacement over
    the whole batch (zero-padded shift, B x B average pool), no host synchronisation."""
    N, C, H, W = a.shape
    Hb, Wb = H // B, W // B
    a32 = a.float()[:, :, : Hb * B, : Wb * B]
    bp = F.pad(b.float(), (r, r, r, r))
    best = torch.full((N, Hb, Wb), float("inf"), device=a.device)
    best_d = torch.zeros((N, Hb, Wb, 2), dtype=torch.int32, device=a.device)
    order = list(candidate_order(r))
    # compiled: the uncached builder (Dynamo skips an lru_cache wrapper anyway, with a warning)
    dyx = _offsets.__wrapped__(r, a.device) if torch.compiler.is_compiling() else _offsets(r, a.device)
    iy, ix = torch.arange(Hb, device=a.device) * B, torch.arange(Wb, device=a.device) * B
    for k, (dy, dx) in enumerate(order):
        # Whether any block has this candidate inside depends only on the grid: plain Python, so
        # no sync and no graph break; the per-block mask is built on the device.
        if not (any_block_inside(dy, B, Hb, H) and any_block_inside(dx, B, Wb, W)):
            continue
        valid = ((iy + dy >= 0) & (iy + dy <= H - B))[:, None] & ((ix + dx >= 0) & (ix + dx <= W - B))[None, :]
        sh = bp[:, :, r + dy : r + dy + Hb * B, r + dx : r + dx + Wb * B]
        mse = F.avg_pool2d((a32 - sh).square().mean(1, keepdim=True), B)[:, 0]
        better = valid & (mse < best)
        best = torch.where(better, mse, best)
        best_d = torch.where(better[..., None], dyx[k], best_d)
    return 10 * torch.log10(data_range**2 / best), best_d


def candidates(H: int, B: int, r: int) -> int:
    """Candidates inside b summed over the blocks of one image (default centres)."""
    per_axis = 0
    for i in range(H // B):
        lo, hi = max(-r, -i * B), min(r, H - B - i * B)
        per_axis += max(0, hi - lo + 1)
    return per_axis * per_axis


def providers(device: str, quick: bool, r: int):
    p = {}
    if device == "cuda":
        from effssl_kernels import _backend

        if _backend.HAS_CUDA_KERNELS:
            p["cuda"] = "cuda"
        if _backend.HAS_TRITON:
            p["triton"] = "triton"
    else:
        p["cpp"] = "auto"
    p["shift loop (torch)"] = "shift"
    if (2 * r + 1) ** 2 <= COMPILE_MAX_CANDIDATES:
        p["torch.compile(shift loop)"] = "compiled"
    if not quick:
        p["reference"] = "reference"
    return p


def kernel_path(how: str) -> str:
    """Which kernel the provider ran (SEMANTICS.md section 5): the CUDA launcher's choice by shape
    (image, tiled or direct, read back after the timed calls), else the provider's only form."""
    if how == "cuda":
        from effssl_kernels import _backend

        return f"{_backend._C.block_match_cuda_last_path()} kernel"
    return {"auto": "C++ direct, 16/8/4-wide tiles", "triton": "Triton direct"}.get(how, "")


def run(device: str, quick: bool = False) -> list[dict]:
    info = device_info(device)
    rows = live_rows()
    compiled = torch.compile(shift_loop, dynamic=False)
    # the smoke run: one 224 case, and a 32 px one whose torch.compile unrolls only 25 candidates
    for name, pairs, H, B, r in [GPU_CASES[0], ("32px B4 r2", 1, 32, 4, 2)] if tiny() else GPU_CASES:
        N = pairs if device == "cuda" else max(1, CPU_PAIRS[H] // (4 if quick else 1))
        N = 1 if tiny() else N
        g = torch.Generator().manual_seed(0)
        a = torch.rand(N, 3, H, H, generator=g).to(device)
        b = (a + 0.1 * torch.rand(N, 3, H, H, generator=g).to(device)).clamp(0, 1)
        flop = 3 * 3 * B * B * candidates(H, B, r) * N
        case_rows = CaseRows(rows)
        base = None
        want = None  # the shift loop's PSNR (the reference's formula): every provider is checked
        for prov, how in providers(device, quick, r).items():
            env = {"EFFSSL_BACKEND": how} if how in ("auto", "cuda", "triton") else {}
            if env:
                fn = lambda: ek.block_match(a, b, B, r)  # noqa: E731
            elif how == "reference":
                fn = lambda: block_match_reference(a, b, B, r)  # noqa: E731
            elif how == "shift":
                fn = lambda: shift_loop(a, b, B, r)  # noqa: E731
            else:
                fn = lambda: compiled(a, b, B, r)  # noqa: E731
            try:
                with mock.patch.dict(os.environ, env):  # the user's own value comes back after
                    psnr = fn()[0]  # warm-up, compile
                    # the slow baselines (~0.5 s a call at 224 px on a GPU) for 1 s: a few
                    # samples, so the 32 px cases still fit gpu_session.sh's time limit
                    t = time_ms(fn, device, min_run_time=0.5 if quick or how in ("reference", "shift") else 2.0)
            except Exception as e:  # report, never hide, a provider that fails
                case_rows.append({"case": name, "pairs": N, "provider": prov, "note": f"failed: {e}"[:120]})
                continue
            tflops = flop / (t["median_ms"] * 1e-3) / 1e12
            row = {"case": name, "pairs": N, "provider": prov, **t, "tflops": tflops,
                   "pct_fp32_limit": pct_of(tflops, info["fp32_tflops_limit"]), "path": kernel_path(how)}
            if base is None and env:  # our first kernel that ran; none ran: no speedups at all
                base = t["median_ms"]
            if want is None:
                want = shift_loop(a, b, B, r)[0]
            check_output(row, psnr, want, 1e-4)  # dB: float32 rounding of the MSE only
            case_rows.append(row)
        for row in case_rows:
            if "median_ms" in row and base is not None:
                row["ours_speedup"] = row["median_ms"] / base  # how much faster our first provider is
    return rows, info


def main(argv=None) -> str:
    args = parse_args(__doc__, "fewer pairs, no slow reference", argv, name="block_match")
    rows, info = run(args.device, args.quick)
    return report(
        args, "block_match",
        f"block_match on {info['device']} (FP32 limit {fmt_limit(info['fp32_tflops_limit'])} TFLOP/s, {info['limit_source']})",
        info, rows,
        ["case", "pairs", "provider", "path", "median_ms", "p20_ms", "p80_ms", "ours_speedup", "tflops", "pct_fp32_limit",
         "max_err", "note"],
    )


if __name__ == "__main__":
    main()
