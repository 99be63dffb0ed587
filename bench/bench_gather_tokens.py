"""gather_tokens: our kernel against timm's plain-PyTorch path, torch.compile and a plain copy.

Cases: ViT-S (D=384) and ViT-B (D=768) with L=196 patch tokens, keep ratio 0.25/0.5/0.75
(K = int(196 * ratio)), 256 samples in bfloat16 on a GPU, 16 in float32 on a CPU; pos_embed in
the tokens' dtype. Modes: forward, and forward+backward (grads of x and pos_embed). Providers:

- ours: the C++ kernel on a CPU, Triton on a GPU (``EFFSSL_BACKEND=auto``);
- torch gather + pos[keep]: ``x.gather(1, keep[..., None].expand(-1, -1, D)) + pos[keep]``, the
  reference, i.e. timm's PatchDropout gather with the positional add moved after it;
- timm (x + pos, gather): timm's real order (``_pos_embed`` on all L tokens, then the gather);
- torch.compile of the gather + pos[keep] path;
- copy: a contiguous copy of the forward output's bytes (read and write), the bandwidth yardstick.

GB/s counts the least traffic each mode needs: forward reads the N*K kept rows of x, pos once
and keep, and writes N*K rows; backward reads the N*K gradient rows and writes all N*L rows of
grad_x (zeros included) and pos's gradient once. ``pct_copy_bw`` is GB/s over the copy's GB/s.

    python -m bench.bench_gather_tokens [--device cuda|cpu] [--out DIR] [--quick]
"""
from __future__ import annotations


import torch

from effssl_kernels.ops.gather_tokens import gather_tokens
from effssl_kernels.reference.gather_tokens import gather_tokens_reference

from .common import CaseRows, check_output, device_info, pct_hbm, live_rows, mark_speedups, parse_args, report, time_ms, timed_row, tiny

WIDTHS = [("ViT-S", 384), ("ViT-B", 768)]
RATIOS = [0.25, 0.5, 0.75]
L = 196
BATCH = {"cuda": 256, "cpu": 16}
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def timm_order(x, keep, pos):
    """timm: positional add on every token, then PatchDropout's gather."""
    x = x + pos
    return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def traffic_bytes(N: int, K: int, D: int, es: int, backward: bool) -> int:
    fwd = (2 * N * K * D + L * D) * es + N * K * 8
    if not backward:
        return fwd
    return fwd + (N * K * D + N * L * D + L * D) * es + N * K * 8


def run(device: str, quick: bool = False):
    info = device_info(device)
    dtype = DTYPE[device]
    es = torch.finfo(dtype).bits // 8
    N = 2 if tiny() else BATCH[device] // (4 if quick else 1)
    info.update(batch=N, tokens=L, dtype=str(dtype).replace("torch.", ""))  # in a partial JSON too
    rows = live_rows()
    for model, D in WIDTHS[:1] if tiny() else WIDTHS:
        for ratio in RATIOS[1:2] if tiny() else RATIOS:
            # a fresh dynamo cache per case: every shape, mode and thread count is a recompile
            torch._dynamo.reset()
            compiled = {m: torch.compile(gather_tokens_reference, dynamic=False) for m in ("fwd", "fwd+bwd")}
            K = int(L * ratio)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(N, L, D, generator=g).to(device, dtype)
            pos = torch.randn(1, L, D, generator=g).to(device, dtype)
            keep = torch.rand(N, L, generator=g).argsort(1)[:, :K].sort(1).values.to(device)
            grad = torch.randn(N, K, D, generator=g).to(device, dtype)
            out = torch.empty(N, K, D, device=device, dtype=dtype)
            xg, pg = x.clone().requires_grad_(), pos.clone().requires_grad_()
            case = f"{model} D={D} keep={ratio} (K={K})"
            copy_gbps = None
            for mode in ("fwd", "fwd+bwd"):
                bwd = mode == "fwd+bwd"
                fns = {
                    "ours": gather_tokens,
                    "torch gather + pos[keep]": gather_tokens_reference,
                    "timm (x + pos, gather)": timm_order,
                    "torch.compile(gather + pos[keep])": compiled[mode],
                }
                nbytes = traffic_bytes(N, K, D, es, bwd)
                case_rows = CaseRows(rows)
                want = {"fwd": gather_tokens_reference(x, keep, pos),
                        "fwd+bwd": torch.autograd.grad(gather_tokens_reference(xg, keep, pg), (xg, pg), grad)}
                for prov, f in fns.items():
                    if bwd:
                        fn = lambda f=f: torch.autograd.grad(f(xg, keep, pg), (xg, pg), grad)  # noqa: E731
                    else:
                        fn = lambda f=f: f(x, keep, pos)  # noqa: E731
                    row = timed_row({"case": case, "mode": mode, "provider": prov}, fn, device,
                                    0.3 if quick else 1.0)
                    if "median_ms" in row:
                        row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
                        # one rounding of the sum in x's dtype apart (the reference adds in it)
                        check_output(row, fn(), want[mode], 1e-2 if dtype != torch.float32 else 1e-6)
                    case_rows.append(row)
                if copy_gbps is None:
                    # a contiguous copy of the output's bytes: the best a copy does (x[:, :K]
                    # would be a strided one, a lower bar)
                    src, dst = x.reshape(-1)[:N * K * D], out.view(-1)
                    t = time_ms(lambda: dst.copy_(src), device, min_run_time=0.3 if quick else 1.0)
                    copy_gbps = 2 * N * K * D * es / (t["median_ms"] * 1e-3) / 1e9
                    copy_row = {"case": case, "mode": "copy", "provider": "copy (yardstick)", **t, "gbps": copy_gbps}
                    case_rows.append(copy_row)
                for r in case_rows:
                    if "gbps" in r:
                        r["pct_copy_bw"] = 100 * r["gbps"] / copy_gbps
                        r["pct_hbm_limit"] = pct_hbm(info, r["gbps"])
                mark_speedups([r for r in case_rows if r["mode"] == mode])
    return rows, info, N, dtype


def main(argv=None) -> str:
    args = parse_args(__doc__, "a quarter of the batch, shorter timing", argv, name="gather_tokens")
    rows, info, N, dtype = run(args.device, args.quick)
    return report(
        args, "gather_tokens",
        f"gather_tokens on {info['device']}, N={N}, L={L}, {info['dtype']} "
        "(ours_speedup: provider time / ours, >1 means ours is faster)",
        info, rows,
        ["case", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "ours_speedup", "gbps", "pct_copy_bw", "pct_hbm_limit", "max_err", "note"],
    )


if __name__ == "__main__":
    main()
