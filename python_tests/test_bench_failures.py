"""The benchmarks when a provider fails: the failure is reported, and no speedup or relative time
is made up against a row that did not run (nor against the wrong baseline)."""
import json
import pathlib
import time

import pytest

import effssl_kernels as ek
from bench import bench_block_match as bm
from bench import bench_simsiam_step as ss
from bench import bench_vit_step as vs
from bench.report import best_alternative_speedups

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_block_match_without_our_kernel_has_no_speedups(monkeypatch):
    monkeypatch.setattr(bm, "GPU_CASES", [("32px B4 r4", 512, 32, 4, 4)])
    monkeypatch.setattr(bm, "CPU_PAIRS", {32: 2})
    monkeypatch.setattr(bm, "COMPILE_MAX_CANDIDATES", 0)  # no torch.compile: fast

    def broken(*a, **k):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(ek, "block_match", broken)
    rows, info = bm.run("cpu", quick=True)
    ours = next(r for r in rows if r["provider"] == "cpp")
    assert ours["note"].startswith("failed: kernel launch failed")
    timed = [r for r in rows if "median_ms" in r]
    assert timed and not any("ours_speedup" in r for r in rows)  # the shift loop is no "ours"
    assert best_alternative_speedups({"block_match": {"rows": rows, "info": info}}) == []


def test_block_match_speedups_are_over_our_row(monkeypatch):
    monkeypatch.setattr(bm, "GPU_CASES", [("32px B4 r4", 512, 32, 4, 4)])
    monkeypatch.setattr(bm, "CPU_PAIRS", {32: 2})
    monkeypatch.setattr(bm, "COMPILE_MAX_CANDIDATES", 0)
    rows, _ = bm.run("cpu", quick=True)
    ours = next(r for r in rows if r["provider"] == "cpp")
    assert ours["ours_speedup"] == 1.0 and ours["path"].startswith("C++")
    loop = next(r for r in rows if r["provider"] == "shift loop (torch)")
    assert loop["ours_speedup"] == pytest.approx(loop["median_ms"] / ours["median_ms"])


def test_vit_step_without_its_baseline_has_no_relative_times(monkeypatch):
    monkeypatch.setattr(vs, "MODELS", vs.MODELS[:1])
    monkeypatch.setattr(vs, "_model", lambda *a, **k: object())

    def step_fn(step, v1, v2, keep, patch, device, amp):
        def fn():
            if keep == 1.0 and patch == 16:
                raise RuntimeError("out of memory")
            time.sleep(0.001)
        return fn, (v1.shape[-1] // patch) ** 2

    monkeypatch.setattr(vs, "_step_fn", step_fn)
    rows, _ = vs.run("cpu", quick=True)
    base = [r for r in rows if r["keep"] == 1.0 and r["patch"] == 16]
    assert base and all(r["note"].startswith("failed: out of memory") for r in base)
    assert any("median_ms" in r for r in rows)
    assert not any("rel_time" in r for r in rows)  # keep 0.75 is no stand-in for keep 1.0


def test_simsiam_step_without_dense_reports_instead_of_crashing(monkeypatch, tmp_path):
    def fake_timed_row(row, fn, device, mrt, warm_up=None):
        if row["provider"] == "dense":
            return {**row, "note": "failed: CUDA out of memory"}
        return {**row, "median_ms": 10.0 * (row["keep"] + 0.1)}

    monkeypatch.setattr(ss, "timed_row", fake_timed_row)
    rows, _ = ss.run("cpu", quick=True)
    assert rows[0]["provider"] == "dense" and rows[0]["note"].startswith("failed")
    assert any("median_ms" in r for r in rows) and not any("rel_time" in r for r in rows)
    ss.plot(rows, str(tmp_path / "step.png"), "test")  # the plot copes too


def test_sigterm_writes_the_rows_so_far(tmp_path):
    # gpu_session.sh stops a benchmark at its time limit with SIGTERM: its finished cases must
    # land in its JSON (marked partial) and in report.md, not be lost with the process.
    import json
    import pathlib
    import subprocess
    import sys

    from bench.report import write_report

    code = """if True:
        import os, signal, time
        from bench import common
        args = common.parse_args("doc", "quick", name="demo")  # argv from the command line
        common._LIVE["info"] = {"device": "test"}
        rows = common.live_rows()
        rows.append({"case": "first", "provider": "ours", "median_ms": 1.5})
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        rows.append({"case": "never"})
    """
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code, "--device", "cpu", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=root)
    assert r.returncode == 128 + 15, r.stdout + r.stderr
    d = json.loads((tmp_path / "demo.json").read_text())
    assert d["rows"] == [{"case": "first", "provider": "ours", "median_ms": 1.5}]
    assert d["info"]["device"] == "test" and "after 1 rows" in d["info"]["partial"]
    write_report(str(tmp_path))
    assert "**Partial run** (stopped by signal 15 after 1 rows)" in (tmp_path / "report.md").read_text()


def test_a_new_benchmark_does_not_inherit_the_last_ones_rows():
    # python -m bench runs several benchmarks in one process: a SIGTERM after the next one's
    # parse_args, before its run() starts its live list, wrote the previous benchmark's rows
    # under the new name (marked partial, over any good JSON of that name).
    from bench import common

    common.parse_args("doc", "quick", ["--device", "cpu"], name="first")
    common._LIVE["info"] = {"device": "test"}
    common.live_rows().append({"case": "c", "provider": "ours", "median_ms": 1.0})
    common.parse_args("doc", "quick", ["--device", "cpu"], name="second")
    assert common._LIVE["target"][1] == "second"
    assert common._LIVE["rows"] == [] and "info" not in common._LIVE


def test_photometric_step_share_rows_are_live_as_they_are_timed(monkeypatch):
    # The augmentation-share rows (issue 7's SimSiam step) were kept in a local list until the
    # end: a SIGTERM after the step and the loop were timed lost them.
    from bench import bench_photometric as bp
    from bench import common

    monkeypatch.setenv("EFFSSL_BENCH_TINY", "1")
    calls = []

    def fake_timed_row(row, fn, device, min_run_time, warm_up=None):
        if len(calls) == 2:  # the step and the torchvision loop are timed: stop before ours
            raise _Stop
        calls.append(row)
        return {**row, "median_ms": 10.0 * len(calls)}

    monkeypatch.setattr(bp, "timed_row", fake_timed_row)
    monkeypatch.setattr(bp, "_loop_row", lambda row, *a: fake_timed_row(row, None, None, None))
    live = common.live_rows()
    with pytest.raises(_Stop):
        bp.step_share("cpu", quick=True, live=live)
    assert [r["provider"] for r in live] == ["torchvision v2 loop (before)"]
    assert live[0]["aug_ms"] == 20.0 and live[0]["step_ms"] == 10.0


class _Stop(BaseException):
    """Stands for SIGTERM's exit in the middle of a case (not an Exception: providers' failures
    are caught and reported, this must not be)."""


def test_a_case_cut_short_keeps_the_rows_it_timed(monkeypatch):
    # gpu_session.sh's time limit can land between two providers of one case: the rows timed
    # before it must be in the live list that SIGTERM writes (they were kept per case before).
    from bench import common

    monkeypatch.setenv("EFFSSL_BENCH_TINY", "1")
    timed = []

    def fake_time_ms(fn, device, min_run_time=None):
        if len(timed) == 1:  # the case's second provider (quick on the CPU: it has two)
            raise _Stop
        timed.append(fn)
        return {"median_ms": float(len(timed))}

    monkeypatch.setattr(bm, "time_ms", fake_time_ms)
    with pytest.raises(_Stop):
        bm.run("cpu", quick=True)
    live = common._LIVE["rows"]
    assert [(r["provider"], r["median_ms"]) for r in live] == [("cpp", 1.0)]


def test_simsiam_step_times_the_issue_targets_first_with_their_ratios(monkeypatch):
    from bench import common

    n = []

    def fake_timed_row(row, fn, device, mrt, warm_up=None):
        if len(n) == 4:
            raise _Stop
        n.append(row)
        return {**row, "median_ms": 10.0 * (0.2 + 0.8 * row["kept"]) if row["provider"] != "dense" else 10.0}

    monkeypatch.setattr(ss, "timed_row", fake_timed_row)
    monkeypatch.setattr(ss, "KEEPS", [1.0, 0.8, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(_Stop):
        ss.run("cpu", quick=False)
    live = common._LIVE["rows"]
    assert [(r["provider"], r["keep"]) for r in live] == [
        ("dense", 1.0), ("packed", 0.0), ("packed", 0.5), ("packed", 0.75)]
    # derived after every case: f = 0.2 from packed at keep 0; keep 0.5 keeps 25 of 49 blocks,
    # and its ideal is of that fraction, 1 / (0.8 * 25 / 49 + 0.2)
    assert live[2]["f_fixed_share"] == pytest.approx(0.2) and live[2]["kept"] == 25 / 49
    assert live[2]["ideal_speedup"] == pytest.approx(1 / (0.8 * 25 / 49 + 0.2))
    assert live[2]["of_ideal"] == pytest.approx(1.0)


def test_sparse_conv_cut_short_keeps_the_jobs_it_timed(monkeypatch):
    # its jobs are timed in interleaved rounds: each row goes out when its job is first timed
    from bench import bench_sparse_conv as sc
    from bench import common

    monkeypatch.setenv("EFFSSL_BENCH_TINY", "1")
    timed = []

    def fake_time_ms(fn, device, min_run_time=None):
        if len(timed) == 4:
            raise _Stop
        timed.append(fn)
        return {"median_ms": float(len(timed)), "p20_ms": 1.0, "p80_ms": 1.0, "samples": 1}

    monkeypatch.setattr(sc, "time_ms", fake_time_ms)
    with pytest.raises(_Stop):
        sc.run("cpu", quick=True)
    live = common._LIVE["rows"]
    assert [r["median_ms"] for r in live] == [1.0, 2.0, 3.0, 4.0]
    assert live[0]["provider"] == "dense" and live[1]["rel_dense"] == 2.0


def test_the_suite_exits_1_when_ours_fails(tmp_path, monkeypatch, capsys):
    # a provider that raised or a kernel that gave a wrong answer was only a note in the table:
    # `python -m bench` (and so a GPU session's stage) exited 0 over it
    import signal
    import sys

    import bench.__main__ as suite
    from bench import bench_tcr_loss as bt

    monkeypatch.setenv("EFFSSL_BENCH_TINY", "1")
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the suite's SIGTERM handler: not in pytest

    def boom(z):
        raise RuntimeError("planted kernel failure")

    monkeypatch.setitem(bt.PROVIDERS, "ours", boom)
    monkeypatch.setattr(sys, "argv", ["bench", "--device", "cpu", "--only", "tcr_loss", "--out", str(tmp_path),
                                      "--no-report"])
    with pytest.raises(SystemExit) as e:
        suite.main()
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "failed or gave a wrong answer" in out and "planted kernel failure" in out
    assert (tmp_path / "tcr_loss.json").is_file()  # the rest of the results still written


def test_problem_rows_are_failures_and_mismatches():
    from bench import common

    rows = [{"note": "failed: RuntimeError: x"}, {"note": "MISMATCH vs the reference (1 > 0)"},
            {"note": "kornia not installed"}, {"note": None}, {}, {"note": "timed on 256 patches, x2.5"},
            {"note": f"goal: met; {common.OVER_LIMIT_NOTE}"}]
    assert common.problem_rows(rows) == rows[:2]


def test_a_sigterm_after_the_json_is_written_does_not_rewrite_it(tmp_path):
    # _LIVE's target outlived report(): a SIGTERM during the plots, the next import or exit
    # rewrote the finished JSON as "partial" (and without the keys main added to info)
    import subprocess
    import sys

    script = f"""
import os, signal
from bench import common
args = common.parse_args("doc", "quick", ["--device", "cpu", "--out", {str(tmp_path)!r}], name="t")
common.write_partial_on_sigterm()
info = common._LIVE["info"] = {{"device": "x"}}
common.live_rows().append({{"case": "c", "provider": "ours", "median_ms": 1.0}})
common.report(args, "t", "title", {{**info, "extra": 1}}, common._LIVE["rows"], ["case"])
os.kill(os.getpid(), signal.SIGTERM)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 128 + 15, r.stderr
    info = json.loads((tmp_path / "t.json").read_text())["info"]
    assert "partial" not in info and info["extra"] == 1
