"""Timing, device limits and result files shared by the benchmarks."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def tiny() -> bool:
    """``EFFSSL_BENCH_TINY=1``: the smoke run of python_tests/test_bench_smoke.py. Every benchmark
    runs a toy size of its first cases with every provider and a token timing, so CI walks every
    code path in seconds; its numbers mean nothing (the JSON says ``"tiny": true``)."""
    return os.environ.get("EFFSSL_BENCH_TINY", "0") == "1"

# FP32 non-tensor peak in TFLOP/s (2 FLOP per FMA) and HBM bandwidth in TB/s, from NVIDIA's
# spec sheets; matched on the device name. Other devices fall back to a measured SGEMM rate.
_SPECS = {  # matched by substring, in this order: the specific names first
    "GH200": (66.9, 4.0),  # Grace Hopper, 96 GB HBM3 (the 144 GB HBM3e part has 4.9 TB/s)
    "H100 PCIe": (51.2, 2.0),
    "H100 NVL": (60.0, 3.9),
    "H100": (66.9, 3.35),  # SXM5 ("H100 80GB HBM3")
    "H200 NVL": (60.0, 4.8),
    "H200": (66.9, 4.8),  # SXM
    "A100": (19.5, 2.0),
}


def _git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def _measured_fp32_tflops(device: str) -> float:
    """Plain fp32 GEMM rate (TF32 off), the practical FP32 ceiling where no spec is known: the
    best of two sizes at their fastest (20th percentile) time, so one noisy median on a shared
    machine does not set a ceiling that a kernel's own GEMM then "exceeds"."""
    best = 0.0
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for n in (2048, 4096) if device == "cuda" else (1024, 2048):
            x = torch.randn(n, n, device=device)
            ms = time_ms(lambda: x @ x, device)["p20_ms"]
            best = max(best, 2 * n**3 / (ms * 1e-3) / 1e12)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return best


def device_info(device: str) -> dict:
    import effssl_kernels

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        spec = next((v for k, v in _SPECS.items() if k in name), None)
    else:
        name = platform.processor() or platform.machine()
        spec = None
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name} ({torch.get_num_threads()} threads)"
    if spec:
        fp32, bw, src = spec[0], spec[1], "spec sheet"
    else:
        fp32, bw, src = _measured_fp32_tflops(device), None, "measured fp32 GEMM"
    return {
        "device": name,
        "fp32_tflops_limit": round(fp32, 2),
        "hbm_tbps_limit": bw,
        "limit_source": src,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "effssl_kernels": effssl_kernels.__version__,
        "git_sha": _git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **({"tiny": True} if tiny() else {}),
    }


def time_ms(fn, device: str, *, min_run_time: float = 1.0) -> dict:
    """Median (and 20th/80th percentile) milliseconds of ``fn()``.

    GPU: triton.testing.do_bench (CUDA events, cache flush between runs). CPU:
    torch.utils.benchmark.Timer.blocked_autorange.
    """
    if device == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    import torch.utils.benchmark as tb

    if tiny():
        min_run_time = 0.01

    # all cores, as a user runs it (Timer defaults to one thread)
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = sorted(m.times)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))] * 1e3  # noqa: E731
    return {"median_ms": m.median * 1e3, "p20_ms": q(0.2), "p80_ms": q(0.8)}


def timed_row(row: dict, fn, device: str, min_run_time: float, warm_up=None) -> dict:
    """``row`` plus ``time_ms(fn)`` after a warm-up (one call, or ``warm_up(fn, device)``); a
    provider that fails gets a ``note`` instead (reported, never hidden)."""
    try:
        if warm_up is None:
            fn()
        else:
            warm_up(fn, device)
        return {**row, **time_ms(fn, device, min_run_time=min_run_time)}
    except Exception as e:  # noqa: BLE001
        return {**row, "note": f"failed: {type(e).__name__}: {e}"[:160]}


def results_dir(device_tag: str) -> str:
    d = os.path.join(RESULTS, device_tag)
    os.makedirs(d, exist_ok=True)
    return d


def write_json(path: str, info: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if c not in ("case", "provider", "note") else "left")
    for r in rows:
        t.add_row(*[_fmt(r.get(c)) for c in columns])
    Console(width=200).print(t)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def mark_speedups(rows: list[dict], ours: str = "ours") -> None:
    """``ours_speedup`` (provider time / ours: > 1 means ours is faster) on every timed row of
    ``rows`` (one case and mode), and ``speedup_vs_<provider>`` on ours' row."""
    mine = next((r for r in rows if r.get("provider") == ours and "median_ms" in r), None)
    if mine is None:
        return
    for r in rows:
        if "median_ms" in r and r is not mine:
            r["ours_speedup"] = r["median_ms"] / mine["median_ms"]
            mine[f"speedup_vs_{r['provider']}"] = r["ours_speedup"]


def parse_args(doc: str, quick_help: str, argv=None):
    """The CLI every benchmark shares: --device, --out, --quick."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<gpu|cpu>)")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    args = ap.parse_args(argv)
    if tiny():
        if args.out is None:  # never over the committed results
            ap.error("EFFSSL_BENCH_TINY=1 (a smoke run) needs --out")
        args.quick = True
    return args


def out_dir(args) -> str:
    """``--out``, else bench/results/<gpu|cpu>, or <gpu|cpu>-quick for a --quick run (git-ignored:
    a quick run never replaces the committed full-size results)."""
    tag = "gpu" if args.device == "cuda" else "cpu"
    out = args.out or results_dir(tag + ("-quick" if args.quick else ""))
    os.makedirs(out, exist_ok=True)
    return out


def report(args, name: str, title: str, info: dict, rows: list[dict], columns: list[str]) -> str:
    """Write ``<out>/<name>.json`` (its info says whether the run was ``quick``), print the
    table, return the JSON path."""
    path = os.path.join(out_dir(args), f"{name}.json")
    write_json(path, {**info, "quick": bool(args.quick)}, rows)
    print_table(title, rows, columns)
    print(f"wrote {path}")
    return path
