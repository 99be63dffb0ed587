"""Run the whole benchmark suite: ``python -m bench [--quick] [--device cpu|cuda] [--out DIR]``.

Sizes fit the machine: the issues' GPU sizes on a GPU, CPU-sized cases on a CPU. Each benchmark
prints its table and writes JSON; then ``report.md`` (every table) and PNG plots (speedup per
kernel, time against keep ratio) are written beside them, and the folder is named at the end.
``--only NAME ...`` runs a subset (e.g. ``--only multi_crop simwnw_step``); ``--no-report``
skips report.md and the plots (gpu_session.sh writes them once, after its last benchmark:
matplotlib's import and the plots cost seconds of a time-limited device call).
Exits 1, after writing everything, when any provider failed or any kernel gave a wrong answer
(a row noting ``failed`` or ``MISMATCH``): the timings of the rest still stand.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from rich.progress import Progress

from .common import OUT_HELP, add_device_arg, check_device, problem_rows, write_partial_on_sigterm
from .report import write_report

BENCHMARKS = [
    "bench.bench_block_match",
    "bench.bench_gather_tokens",
    "bench.bench_patch_embed_gather",
    "bench.bench_vit_step",
    "bench.bench_halo_gather",
    "bench.bench_sparse_conv",
    "bench.bench_simsiam_step",
    "bench.bench_multi_crop",
    "bench.bench_photometric",
    "bench.bench_simwnw_step",
    "bench.bench_tcr_loss",
    "bench.bench_emp_ssl_step",
]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arg(ap)
    ap.add_argument("--out", default=None, help=OUT_HELP)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, skip the slowest baselines")
    ap.add_argument("--only", nargs="+", default=None, help="benchmark names without the bench_ prefix")
    ap.add_argument("--no-report", action="store_true",
                    help="write the JSON only, not report.md and the plots (python -m bench.report DIR writes them)")
    args = ap.parse_args()
    check_device(ap, args)
    write_partial_on_sigterm()  # a benchmark stopped at a time limit leaves its finished cases
    names = BENCHMARKS
    if args.only:
        names = [f"bench.bench_{n}" for n in args.only]
        unknown = sorted(set(names) - set(BENCHMARKS))
        if unknown:
            ap.error(f"unknown benchmarks {unknown}; choose from {[n[12:] for n in BENCHMARKS]}")
    paths = []
    with Progress() as progress:
        task = progress.add_task("benchmarks", total=len(names))
        for name in names:
            progress.update(task, description=name)
            mod = importlib.import_module(name)
            argv = ["--device", args.device] + (["--quick"] if args.quick else [])
            if args.out:
                argv += ["--out", args.out]
            paths.append(mod.main(argv))
            progress.advance(task)
    folder = os.path.dirname(paths[-1])
    print("results:", *paths, sep="\n  ")
    if not args.no_report:
        print(f"report: {write_report(folder)}")
    print(f"results folder: {folder}")
    bad = []
    for path in paths:
        with open(path) as f:
            bad += [(os.path.basename(path), r) for r in problem_rows(json.load(f)["rows"])]
    if bad:
        print(f"{len(bad)} row(s) failed or gave a wrong answer:")
        for name, r in bad:
            print(f"  {name}: {r.get('case')} / {r.get('mode', '')} {r.get('provider')}: {r['note']}")
        sys.exit(1)


if __name__ == "__main__":
    main()
