"""Timing, device limits and result files shared by the benchmarks."""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import tempfile
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# The running benchmark's info and rows, for the partial JSON written on SIGTERM (live_rows).
_LIVE: dict = {}


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
    """HEAD's short sha, with ``-dirty`` where tracked files have uncommitted changes, or
    ``EFFSSL_GIT_SHA`` (a lent GPU machine gets the working tree without .git: gpu_session.sh's
    header says how to pass it)."""
    if os.environ.get("EFFSSL_GIT_SHA"):
        return os.environ["EFFSSL_GIT_SHA"]
    try:  # "-dirty": the code that ran is not the commit's (uncommitted changes)
        # --exclude='*': a sha even where a tag names the commit
        return subprocess.check_output(["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"],
                                       text=True, stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return "unknown"


def _gemm_tflops(device: str, dtype: torch.dtype, sizes) -> float:
    """Square GEMM rate (TF32 off), a practical ceiling: the best of ``sizes`` at their fastest
    (20th percentile) time, so one noisy median on a shared machine does not set a ceiling that
    a kernel's own GEMM then "exceeds"."""
    best = 0.0
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for n in sizes:
            x = torch.randn(n, n, device=device).to(dtype)  # never zeros (METHOD.md)
            ms = time_ms(lambda: x @ x, device)["p20_ms"]
            best = max(best, 2 * n**3 / (ms * 1e-3) / 1e12)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return best


def _measure_ceilings(device: str, copy_numel: int = 2**28, gemm_sizes=(4096, 8192)) -> dict:
    """A device-to-device copy of ``copy_numel`` floats (1 GiB; bytes read + written) and square
    GEMMs in fp32 (TF32 off) and bf16, each at its fastest (p20) time."""
    src = torch.empty(copy_numel, device=device).uniform_()  # never zeros (METHOD.md)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)["p20_ms"]
    return {"copy_tbps": 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12,
            "fp32_tflops": _gemm_tflops(device, torch.float32, gemm_sizes),
            "bf16_tflops": _gemm_tflops(device, torch.bfloat16, gemm_sizes)}


CEILINGS_MAX_AGE_S = 3600


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _gpu_ceilings(name: str) -> dict:
    """The GPU's measured ceilings (the device method: datasheet rates are leads, measured
    ceilings the limits), :func:`_measure_ceilings`. About 2 s, so cached per GPU, torch and boot
    in the temp folder for an hour: the benchmark processes of one session reuse them, and a
    rerun later (on a machine that was busy the first time) measures afresh."""
    key = f"{name} | torch {torch.__version__} | boot {_boot_id()}"
    path = os.path.join(tempfile.gettempdir(), "effssl_bench_gpu_ceilings.json")
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key and 0 <= time.time() - cached.get("time", -1e18) < CEILINGS_MAX_AGE_S:
            return cached["ceilings"]
    except (OSError, ValueError, TypeError):
        pass
    ceilings = _measure_ceilings("cuda")
    try:
        with open(path, "w") as f:
            json.dump({"key": key, "time": time.time(), "ceilings": ceilings}, f)
    except OSError:
        pass
    return ceilings


def device_info(device: str) -> dict:
    """Device, versions, date and the limits the tables' "% of limit" columns divide by: on a GPU
    the measured ceilings (``fp32_tflops_limit``, ``bf16_tflops_limit``, ``hbm_tbps_limit`` =
    copy rate), the spec sheet's beside them; on a CPU a measured fp32 GEMM rate."""
    import effssl_kernels

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        spec = next((v for k, v in _SPECS.items() if k in name), (None, None))
        limits = {"fp32_tflops_spec": spec[0], "hbm_tbps_spec": spec[1]}
        try:
            m = _gpu_ceilings(name)
            # unrounded: every pct_* column divides by these (titles round with fmt_limit)
            limits.update(fp32_tflops_limit=m["fp32_tflops"], bf16_tflops_limit=m["bf16_tflops"],
                          hbm_tbps_limit=m["copy_tbps"],
                          limit_source="measured on this GPU (1 GiB copy, fp32 and bf16 GEMMs)")
        except Exception as e:  # noqa: BLE001  (the benchmarks still run; the JSON says why)
            limits.update(fp32_tflops_limit=spec[0] or float("nan"), hbm_tbps_limit=spec[1],
                          limit_source=f"spec sheet (measuring failed: {type(e).__name__}: {e})"[:160])
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name} ({torch.get_num_threads()} threads)"
        # unrounded: a CPU's 0.03-0.2 TFLOP/s rounded to 2 decimals moved every pct_* by up to
        # 12%, and below 5 GFLOP/s became 0 (a division by zero)
        limits = {"fp32_tflops_limit": _gemm_tflops(device, torch.float32, (1024, 2048)),
                  "hbm_tbps_limit": None,
                  "limit_source": "measured fp32 GEMM"}
    info = {
        "device": name,
        **limits,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "effssl_kernels": effssl_kernels.__version__,
        "git_sha": _git_sha(),
        "bench_device": device,  # "cuda" above is torch's build, not where the benchmark ran
        # what "ours" ran: parse_args drops EFFSSL_BACKEND (ours = the device's default kernels)
        "effssl_backend": os.environ.get("EFFSSL_BACKEND", "auto"),
        "effssl_tile_conv": os.environ.get("EFFSSL_TILE_CONV", "default"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **({"tiny": True} if tiny() else {}),
    }
    _LIVE["info"] = info
    return info


MIN_GPU_SAMPLES = 20


def time_ms(fn, device: str, *, min_run_time: float = 1.0) -> dict:
    """Median (and 20th/80th percentile) milliseconds of ``fn()``, and how many timed ``samples``.

    GPU: triton.testing.do_bench (CUDA events, L2 flushed between runs), repeating for 200 ms or
    ``MIN_GPU_SAMPLES`` calls, whichever is longer, but at most ``min_run_time`` (do_bench
    repeats for a time, not a count: a 150 ms training step got one sample in 200 ms). CPU:
    torch.utils.benchmark.Timer.blocked_autorange.
    """
    if device == "cuda":
        import triton.testing

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        rep = min(1e3 * min_run_time, max(200.0, MIN_GPU_SAMPLES * start.elapsed_time(end)))
        times = sorted(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="all"))
    else:
        import torch.utils.benchmark as tb

        if tiny():
            min_run_time = 0.01
        # all cores, as a user runs it (Timer defaults to one thread)
        timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        times = sorted(t * 1e3 for t in timer.blocked_autorange(min_run_time=min_run_time).times)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    mid = len(times) // 2
    median = times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2
    return {"median_ms": median, "p20_ms": q(0.2), "p80_ms": q(0.8), "samples": len(times)}


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
    """``{"info": info, "rows": rows}`` to ``path``; every benchmark's JSON goes through here
    (report(), a partial run's, photometric's two tables), so every one flags rates above their
    measured limit (:func:`flag_over_limit`, with a warning)."""
    over = flag_over_limit(rows)
    if over:
        print(f"warning: {over} row(s) above 100% of a measured limit: a ceiling measured at the start "
              f"(pct_hbm_limit, TFLOP/s limits; on a GPU reused for an hour, CEILINGS_MAX_AGE_S) or a "
              f"yardstick copy timed with the case (pct_copy_bw) came out too low on a loaded machine, "
              f"or the data sat in a cache; rerun on an idle machine")
    with open(path, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    # written: a SIGTERM from now on (plots, the next import, exit) must not rewrite it as partial
    _LIVE.pop("target", None)


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


def kept_count(keep: float, n: int) -> int:
    """How many of ``n`` blocks a benchmark's "keep" ratio keeps: ``ceil(keep * n)``, so a case
    never keeps fewer than it says (``round`` kept 24 of 49 blocks at keep 0.5, flattering a
    removal target). Rows record the fraction kept (``kept``) and ideals use it."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    return min(n, math.ceil(keep * n - 1e-9))  # 1e-9: 0.7 * 10 is 7.000000000000001


@contextlib.contextmanager
def cudnn_benchmark(on: bool = True):
    """``torch.backends.cudnn.benchmark`` set for the block, then restored: a user's best for
    fixed shapes (cuDNN times its algorithms once per shape)."""
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = prev


def live_rows() -> list:
    """A new, empty list for a benchmark's ``run()`` to collect its rows in, case by case: if the
    process is stopped (SIGTERM: gpu_session.sh's time limit) the rows so far are written as the
    benchmark's JSON, marked ``partial``, so a run cut short still leaves its finished cases
    (see :func:`write_partial_on_sigterm`)."""
    _LIVE["rows"] = []
    return _LIVE["rows"]


def pct_of(rate: float, limit) -> float | None:
    """``rate`` as a percentage of ``limit`` (same units); None where there is no usable limit
    (missing, zero or NaN: a spec-sheet fallback for an unknown GPU, a failed measurement)."""
    return 100 * rate / limit if limit and math.isfinite(limit) and limit > 0 else None


def fmt_limit(limit) -> str:
    """A limit for a table title: 3 significant digits (a CPU's 0.034 TFLOP/s is not "0.0")."""
    return "unknown" if limit is None or not math.isfinite(limit) else f"{limit:.3g}"


def pct_hbm(info: dict, gbps: float) -> float | None:
    """GB/s as a percentage of the device's measured large-copy ceiling (``hbm_tbps_limit``:
    a 1 GiB copy on a GPU); None where there is none (the CPU). The per-case ``pct_copy_bw``
    divides by a copy of the case's own size instead, which a small case runs below the ceiling."""
    lim = info.get("hbm_tbps_limit")
    return pct_of(gbps, 1e3 * lim) if lim else None


def check_output(row: dict, got, want, tol: float) -> dict:
    """``row["max_err"]`` = max |got - want| / max |want| over the finite entries of the tensors
    (infinite and NaN ones must be where they are), and a ``MISMATCH`` note above ``tol``: a benchmark's timings
    count only for a kernel that also gave the right answer at the timed shape (the smoke test
    fails on any MISMATCH)."""
    err = 0.0
    for g, w in zip(got if isinstance(got, (tuple, list)) else [got],
                    want if isinstance(want, (tuple, list)) else [want]):
        g, w = g.detach().double(), w.detach().double()
        fin = torch.isfinite(w)
        inf = w.isinf()
        if g.shape != w.shape or not torch.equal(torch.isfinite(g), fin) \
                or not torch.equal(g.isnan(), w.isnan()) or not torch.equal(g[inf], w[inf]):
            err = float("inf")
            break
        scale = w[fin].abs().max().item() if fin.any() else 1.0
        diff = (g[fin] - w[fin]).abs().max().item() if fin.any() else 0.0
        err = max(err, diff / max(scale, 1e-12))
    row["max_err"] = err
    if not err <= tol:
        row["note"] = f"MISMATCH vs the reference ({err:.3g} > {tol:g})" + (f"; {row['note']}" if row.get("note") else "")
    return row


def problem_rows(rows: list[dict]) -> list[dict]:
    """The rows whose provider failed (``failed: ...``) or gave a wrong answer (``MISMATCH``):
    ``python -m bench`` exits 1 over any of them, so a device session's stage fails too."""
    return [r for r in rows if str(r.get("note") or "").startswith("failed") or "MISMATCH" in str(r.get("note") or "")]


class CaseRows(list):
    """One case's rows (for its derived columns: speedups, % of copy) that are also added to the
    benchmark's live list the moment each is appended, so a run stopped at its time limit keeps
    every row timed so far; derived columns filled in later land in the same dicts."""

    def __init__(self, live: list):
        super().__init__()
        self._live = live

    def append(self, row: dict) -> None:
        super().append(row)
        self._live.append(row)

    def extend(self, rows) -> None:
        for r in rows:
            self.append(r)


def write_partial_on_sigterm() -> None:
    """Make SIGTERM write the running benchmark's rows so far (its :func:`live_rows`, to the JSON
    :func:`parse_args` named) and exit 143. The command-line entry points install it (``python -m
    bench``, ``python -m bench.bench_NAME``); a benchmark's ``main`` called from Python does not."""
    def write(signum, frame):
        target = _LIVE.get("target")
        if target is not None:
            args, name = target
            rows = _LIVE.get("rows") or []
            path = os.path.join(out_dir(args), f"{name}.json")
            info = {**_LIVE.get("info", {}), "quick": bool(args.quick),
                    "partial": f"stopped by signal {signum} after {len(rows)} rows"}
            write_json(path, info, rows)
            print(f"stopped by signal {signum}: wrote the {len(rows)} rows timed so far to {path}", flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, write)


def add_device_arg(ap) -> None:
    """--device cpu|cuda (default cuda when torch sees one). Only these two: a "cuda:0" would be
    filed and timed as a CPU run. Check the choice with :func:`check_device` after parsing."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                    help="where to run (default: cuda when torch sees a GPU, else cpu; sizes follow it)")


def check_device(ap, args) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device on this machine")


def int_at_least(minimum: int):
    """argparse type: an int >= ``minimum`` (a clear usage error otherwise, before any work)."""
    import argparse

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {v}")
        return v

    return parse


def parse_args(doc: str, quick_help: str, argv=None, *, name: str | None = None):
    """The CLI every benchmark shares: --device, --out, --quick. ``name`` (the JSON's) is where a
    SIGTERM writes the partial rows; run from the command line (``argv`` None) it installs
    :func:`write_partial_on_sigterm`."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m bench.bench_{name}" if name else None, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arg(ap)
    ap.add_argument("--out", default=None, help=OUT_HELP)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    args = ap.parse_args(argv)
    check_device(ap, args)
    # "ours" is the device's default kernels in every benchmark: a user's EFFSSL_BACKEND would
    # time something else under that name (and, dropped by some benchmarks only, differ by order)
    backend = os.environ.pop("EFFSSL_BACKEND", None)
    if backend not in (None, "", "auto"):
        print(f"note: EFFSSL_BACKEND={backend} ignored by the benchmarks: 'ours' is the device's default backend")
    if tiny():
        if args.out is None:  # never over the committed results
            ap.error("EFFSSL_BENCH_TINY=1 (a smoke run) needs --out")
        args.quick = True
    if name is not None:
        # A new benchmark in this process: the previous one's rows and info are not its own
        # (a SIGTERM before its run() starts collecting must not write them under its name).
        _LIVE["target"] = (args, name)
        _LIVE["rows"] = []
        _LIVE.pop("info", None)
        if argv is None:
            write_partial_on_sigterm()
    return args


OUT_HELP = "results folder (default bench/results/<gpu|cpu>, or <gpu|cpu>-quick with --quick)"


def out_dir(args) -> str:
    """``--out``, else bench/results/<gpu|cpu>, or <gpu|cpu>-quick for a --quick run (git-ignored:
    a quick run never replaces the committed full-size results)."""
    tag = "gpu" if args.device == "cuda" else "cpu"
    out = args.out or results_dir(tag + ("-quick" if args.quick else ""))
    os.makedirs(out, exist_ok=True)
    return out


OVER_LIMIT_NOTE = "above 100% of the measured limit: not a real rate (see the run's warning)"


def flag_over_limit(rows: list[dict]) -> int:
    """Note every row with a ``pct_*`` column above 100 (a rate past the ceiling measured for
    this run means the ceiling is wrong, not the kernel fast); returns how many."""
    n = 0
    for r in rows:
        # 100.5: the yardstick's own row (a copy at 100% of the copy rate) rounds either side of 100
        if any(k.startswith("pct_") and isinstance(v, (int, float)) and v > 100.5 for k, v in r.items()):
            note = r.get("note")
            if not note or OVER_LIMIT_NOTE not in note:
                r["note"] = f"{note}; {OVER_LIMIT_NOTE}" if note else OVER_LIMIT_NOTE
            n += 1
    return n


def report(args, name: str, title: str, info: dict, rows: list[dict], columns: list[str]) -> str:
    """Write ``<out>/<name>.json`` (its info says whether the run was ``quick``), print the
    table, return the JSON path."""
    path = os.path.join(out_dir(args), f"{name}.json")
    write_json(path, {**info, "quick": bool(args.quick)}, rows)  # notes rows above their limit
    print_table(title, rows, columns)
    print(f"wrote {path}")
    return path
