"""The suite's report (bench/report.py) on a folder of small synthetic results."""
import json
import os

import pytest

from bench.report import best_alternative_speedups, keep_curves, write_report  # repo root on pythonpath


def _write(folder, name, rows):
    info = {"device": "test", "torch": "x", "cuda": None, "triton": None, "effssl_kernels": "0", "git_sha": "s",
            "date": "d", "batch": 4}
    (folder / f"{name}.json").write_text(json.dumps({"info": info, "rows": rows}))


def test_report_tables_speedups_and_curves(tmp_path):
    _write(tmp_path, "kern", [
        {"case": "a", "provider": "ours", "median_ms": 1.0},
        {"case": "a", "provider": "torch", "median_ms": 3.0, "ours_speedup": 3.0},
        {"case": "a", "provider": "compile", "median_ms": 2.0, "ours_speedup": 2.0},
        {"case": "a", "provider": "copy (yardstick)", "median_ms": 0.5, "ours_speedup": 0.5},
        {"case": "b", "provider": "ours", "median_ms": 1.0, "speedup_vs_torch": 0.8, "speedup_vs_ours (check)": 0.1},
    ])
    _write(tmp_path, "step", [
        {"provider": "dense", "keep": 1.0, "median_ms": 10.0, "rel_time": 1.0},
        {"provider": "packed", "keep": 1.0, "median_ms": 11.0, "rel_time": 1.1},
        {"provider": "packed", "keep": 0.5, "median_ms": 7.0, "rel_time": 0.7},
    ])
    (tmp_path / "not_a_result.json").write_text("[1, 2]")
    # best alternative: min over real alternatives (not the yardstick, not a variant of ours)
    sp = dict(best_alternative_speedups({"kern": json.loads((tmp_path / "kern.json").read_text())}))
    assert sp == {"kern: a": 2.0, "kern: b": 0.8}
    curves = keep_curves({"step": json.loads((tmp_path / "step.json").read_text())})
    assert sorted(curves["step"]["packed"]) == [(0.5, 0.7), (1.0, 1.1)]
    path = write_report(str(tmp_path))
    text = open(path).read()
    assert "## kern" in text and "## step" in text and "| case | provider | median_ms" in text
    assert "batch: 4" in text and "## not_a_result" not in text
    assert "- not_a_result.json (not a benchmark result" in text  # skipped, and said so
    pytest.importorskip("matplotlib")
    assert (tmp_path / "speedup_per_kernel.png").stat().st_size > 0
    assert (tmp_path / "time_vs_keep.png").stat().st_size > 0


def _report_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "bench.report", *args], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_missing_folder_is_a_usage_error(tmp_path):
    proc = _report_cli(str(tmp_path / "nope"))
    assert proc.returncode == 2 and "is not a folder" in proc.stderr and "Traceback" not in proc.stderr
    assert "usage: python -m bench.report" in proc.stderr


def test_help_is_help_not_a_folder():
    proc = _report_cli("--help")
    assert proc.returncode == 0 and "RESULTS_DIR" in proc.stdout and proc.stderr == ""


def test_emp_ssl_patches_only_is_a_bar_of_its_own():
    rows = [{"case": "P=200 N=64", "provider": "multi_crop", "median_ms": 10.0, "speedup_vs_cpu loader": 1.5},
            {"case": "P=200 N=64", "provider": "cpu loader", "median_ms": 15.0, "ours_speedup": 1.5},
            {"case": "P=200 N=64", "provider": "multi_crop (patches only)", "median_ms": 3.0,
             "speedup_vs_cpu loader (patches only)": 0.3},
            {"case": "P=200 N=64", "provider": "cpu loader (patches only)", "median_ms": 0.9, "ours_speedup": 0.3}]
    got = dict(best_alternative_speedups({"emp_ssl_step": {"rows": rows, "info": {}}}))
    assert got == {"emp_ssl_step: P=200 N=64": 1.5, "emp_ssl_step: P=200 N=64 patches only": 0.3}


def test_unreadable_results_are_named_not_dropped(tmp_path):
    # a JSON cut short by a kill vanished from report.md without a word, exit 0
    _write(tmp_path, "good", [{"case": "a", "provider": "ours", "median_ms": 1.0}])
    (tmp_path / "cut.json").write_text('{"info": {"device": "x"}, "rows": [{"case"')
    proc = _report_cli(str(tmp_path))
    assert proc.returncode == 0 and "skipped cut.json (JSONDecodeError" in proc.stderr
    text = (tmp_path / "report.md").read_text()
    assert "**Skipped files**" in text and "- cut.json (JSONDecodeError" in text and "## good" in text


def test_a_folder_without_results_fails(tmp_path):
    proc = _report_cli(str(tmp_path))
    assert proc.returncode == 1 and "no benchmark results in" in proc.stderr
    assert "No benchmark results in this folder." in (tmp_path / "report.md").read_text()


def test_bars_and_curves_of_the_benchmarks_row_shapes():
    # block_match: ours' own row carries ours_speedup 1.0 (its time over itself): no alternative
    bm = [{"case": "c", "provider": "cpp", "median_ms": 1.0, "ours_speedup": 1.0},
          {"case": "c", "provider": "shift loop (torch)", "median_ms": 4.0, "ours_speedup": 4.0}]
    # gather_tokens: a bar per mode (fwd: ours 2x faster; fwd+bwd: 0.5x), not the min over both
    gt = [{"case": "c", "mode": "fwd", "provider": "ours", "median_ms": 1.0, "speedup_vs_torch": 2.0},
          {"case": "c", "mode": "fwd+bwd", "provider": "ours", "median_ms": 4.0, "speedup_vs_torch": 0.5}]
    sp = dict(best_alternative_speedups({"bm": {"rows": bm, "info": {}}, "gt": {"rows": gt, "info": {}}}))
    assert sp == {"bm: c": 4.0, "gt: c fwd": 2.0, "gt: c fwd+bwd": 0.5}
    # sparse_conv: rel_dense (no rel_time), a curve per layer
    sc = [{"layer": la, "keep": k, "mode": "fwd", "provider": "ours packed", "rel_dense": v}
          for la, k, v in (("l1", 1.0, 1.1), ("l1", 0.5, 0.6), ("l3", 1.0, 1.3), ("l3", 0.5, 0.9))]
    assert keep_curves({"sc": {"rows": sc, "info": {}}}) == {
        "sc": {"ours packed l1 fwd": [(1.0, 1.1), (0.5, 0.6)], "ours packed l3 fwd": [(1.0, 1.3), (0.5, 0.9)]}}
