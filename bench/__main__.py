"""Run the whole benchmark suite: ``python -m bench [--quick] [--device cpu|cuda] [--out DIR]``.

Sizes fit the machine: the issue's GPU sizes on a GPU, smaller pair counts on a CPU. Each
benchmark prints its table and writes JSON; the folder is named at the end.
"""
from __future__ import annotations

import argparse
import importlib

import torch
from rich.progress import Progress

BENCHMARKS = [
    "bench.bench_block_match",
    "bench.bench_gather_tokens",
    "bench.bench_patch_embed_gather",
    "bench.bench_vit_step",
    "bench.bench_halo_gather",
    "bench.bench_sparse_conv",
    "bench.bench_simsiam_step",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<gpu|cpu>)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, skip the slowest baselines")
    args = ap.parse_args()
    paths = []
    with Progress() as progress:
        task = progress.add_task("benchmarks", total=len(BENCHMARKS))
        for name in BENCHMARKS:
            progress.update(task, description=name)
            mod = importlib.import_module(name)
            argv = ["--device", args.device] + (["--quick"] if args.quick else [])
            if args.out:
                argv += ["--out", args.out]
            paths.append(mod.main(argv))
            progress.advance(task)
    print("results:", *paths, sep="\n  ")


if __name__ == "__main__":
    main()
