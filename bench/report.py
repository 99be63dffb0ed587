"""The suite's report: every ``<name>.json`` of a results folder -> ``report.md`` (one table per
benchmark) and two plots: ``speedup_per_kernel.png`` (ours against the best alternative of each
case) and ``time_vs_keep.png`` (relative step/layer time against the keep ratio).

    python -m bench.report DIR
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from .common import _fmt

_HIDE = {"p20_ms", "p80_ms"}  # in the JSON; the report keeps the median
_RUN_KEYS = ("device", "bench_device", "torch", "cuda", "triton", "effssl_kernels", "git_sha", "date")


def _load(folder: str) -> tuple[dict[str, dict], list[str]]:
    """The folder's results by name, and the ``*.json`` files that are none (unreadable, cut
    short by a kill, or not ``{"info", "rows"}``), each with why: reported, never dropped silently."""
    out, skipped = {}, []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            skipped.append(f"{os.path.basename(path)} ({type(e).__name__}: {e})"[:200])
            continue
        if isinstance(d, dict) and "rows" in d and "info" in d:
            out[os.path.splitext(os.path.basename(path))[0]] = d
        else:
            skipped.append(f"{os.path.basename(path)} (not a benchmark result: no info and rows)")
    return out, skipped


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k not in _HIDE]
    return cols


def _table(rows: list[dict]) -> str:
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines)


_OURS = {"ours", "cpp", "cuda", "triton"}


def _is_ours(provider: str) -> bool:
    """Our kernels, under any variant name ("ours", "ours (check=True)", "ours packed, ...")."""
    return provider in _OURS or provider.startswith("ours")


def best_alternative_speedups(results: dict[str, dict]) -> list[tuple[str, float]]:
    """``[(label, speedup)]`` per benchmark case (and mode): ours against the best alternative,
    i.e. the smallest ``ours_speedup`` (provider time / ours) of the other providers' rows, or of
    the ``speedup_vs_<provider>`` fields on ours' row. Yardsticks (a plain copy) are no
    alternative and are left out."""
    out = []
    for name, d in results.items():
        groups: dict[str, list[float]] = {}
        for r in d["rows"]:
            label = " ".join(f"keep {r[k]}" if k == "keep" else str(r[k])
                             for k in ("case", "layer", "keep", "mode") if r.get(k) is not None)
            prov = str(r.get("provider", ""))
            if "(patches only)" in prov:  # emp_ssl_step: the patches alone are a case of their own
                label += " patches only"
            vals = groups.setdefault(f"{name}: {label}"[:70], [])
            if not _is_ours(prov) and "yardstick" not in prov and isinstance(r.get("ours_speedup"), (int, float)):
                vals.append(r["ours_speedup"])
            vals += [v for k, v in r.items() if k.startswith("speedup_vs_") and not _is_ours(k[len("speedup_vs_"):])
                     and "yardstick" not in k and isinstance(v, (int, float))]
        out += [(label, min(v)) for label, v in groups.items() if v]
    return out


def keep_curves(results: dict[str, dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{benchmark: {series: [(keep, relative time)]}}`` for every benchmark whose rows carry
    ``keep`` and ``rel_time`` or ``rel_dense``."""
    out: dict = {}
    for name, d in results.items():
        for r in d["rows"]:
            rel = r.get("rel_time", r.get("rel_dense"))
            if r.get("keep") is None or not isinstance(rel, (int, float)):
                continue
            series = " ".join(str(r[k]) for k in ("provider", "layer", "mode", "model", "sweep", "patch")
                              if r.get(k) is not None)
            out.setdefault(name, {}).setdefault(series or name, []).append((float(r["keep"]), rel))
    return out


def _plots(results: dict, folder: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    sp = best_alternative_speedups(results)
    if sp:
        fig, ax = plt.subplots(figsize=(9, 0.28 * len(sp) + 1.2))
        labels, vals = zip(*sp)
        ax.barh(range(len(sp)), vals, color=["tab:green" if v >= 1 else "tab:red" for v in vals])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(sp)), labels, fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("speedup of ours over the best alternative (>1: ours faster)")
        ax.invert_yaxis()
        fig.tight_layout()
        paths.append(os.path.join(folder, "speedup_per_kernel.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    curves = keep_curves(results)
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
        for ax, (name, series) in zip(axes[0], curves.items()):
            for label, pts in series.items():
                if len(pts) > 1:
                    ax.plot(*zip(*sorted(pts)), marker="o", ms=3, label=label[:40])
            ax.axhline(1.0, color="k", ls="--", lw=0.8)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("keep ratio")
            ax.set_ylabel("time relative to dense")
            ax.legend(fontsize=5)
        fig.tight_layout()
        paths.append(os.path.join(folder, "time_vs_keep.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(folder: str) -> str:
    """Write ``report.md`` and the plots for the JSON results in ``folder``; return its path."""
    results, skipped = _load(folder)
    for s in skipped:
        print(f"warning: {folder}: skipped {s}", file=sys.stderr)
    plots = _plots(results, folder)
    lines = ["# effssl_kernels benchmark report", ""]
    if skipped:
        lines += ["**Skipped files** (not in the tables below):", "", *[f"- {s}" for s in skipped], ""]
    if not results:
        lines += ["No benchmark results in this folder.", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots] + [""]
    for name, d in results.items():
        # each result names its own run: a folder may hold runs of several commits, days or devices
        info = d["info"]
        where = f" ({info['bench_device']})" if info.get("bench_device") else ""
        run = (f"Device: {info.get('device')}{where}; torch {info.get('torch')} (CUDA build {info.get('cuda')}), "
               f"Triton {info.get('triton')}; effssl_kernels {info.get('effssl_kernels')} "
               f"({info.get('git_sha')}); {info.get('date')}.")
        extra = {k: v for k, v in info.items() if k not in _RUN_KEYS and k != "partial"}
        partial = [f"**Partial run** ({info['partial']}): the cases after these did not run.", ""] \
            if info.get("partial") else []
        lines += [f"## {name}", "", run, "", *partial, ", ".join(f"{k}: {v}" for k, v in extra.items()), "",
                  _table(d["rows"]), ""]
    path = os.path.join(folder, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report",
                                     description="Markdown report and plots of a folder of benchmark JSON results.")
    parser.add_argument("folder", nargs="?", default="bench/results/cpu", metavar="RESULTS_DIR",
                        help="folder of *.json results; report.md and the plots are written there "
                             "(default: bench/results/cpu)")
    folder = parser.parse_args(argv).folder
    if not os.path.isdir(folder):
        parser.error(f"{folder} is not a folder")
    print(write_report(folder))
    if not _load(folder)[0]:
        sys.exit(f"no benchmark results in {folder}")


if __name__ == "__main__":
    main()
