"""bench/common.py's GPU-only logic, run on the CPU with fakes where it needs a GPU: the timer's
repeat time (a slow step must get many samples, not one) and the measured ceilings."""
import json

import pytest
import torch

pytest.importorskip("triton")

from bench import common
from utils import without_gpu


class _FakeEvent:
    """A CUDA event whose elapsed time is set by the test."""
    elapsed = 0.0

    def __init__(self, enable_timing=False):
        pass

    def record(self):
        pass

    def elapsed_time(self, other):
        return _FakeEvent.elapsed


@pytest.mark.parametrize("one_call_ms,min_run_time,want_rep", [
    (0.05, 1.0, 200.0),    # a fast kernel: do_bench's 200 ms already gives thousands of samples
    (150.0, 2.0, 2000.0),  # a training step: up to min_run_time (13 samples, not 1)
    (30.0, 1.0, 600.0),    # MIN_GPU_SAMPLES calls
])
def test_gpu_timer_repeats_long_enough(monkeypatch, one_call_ms, min_run_time, want_rep):
    import triton.testing

    seen = {}

    def do_bench(fn, warmup, rep, return_mode):
        seen.update(rep=rep, return_mode=return_mode)
        return [3.0, 1.0, 2.0, 5.0, 4.0]

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    _FakeEvent.elapsed = one_call_ms
    calls = []
    t = common.time_ms(lambda: calls.append(1), "cuda", min_run_time=min_run_time)
    assert seen == {"rep": pytest.approx(want_rep), "return_mode": "all"}
    assert calls == [1]  # the one call that sized the repeat time
    assert t == {"median_ms": 3.0, "p20_ms": 2.0, "p80_ms": 5.0, "samples": 5}


def test_cpu_timer_reports_samples():
    t = common.time_ms(lambda: None, "cpu", min_run_time=0.01)
    assert t["samples"] >= 1 and t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]


def test_measured_ceilings_at_toy_size():
    m = common._measure_ceilings("cpu", copy_numel=2**16, gemm_sizes=(32, 64))
    assert set(m) == {"copy_tbps", "fp32_tflops", "bf16_tflops"} and all(v > 0 for v in m.values())


def test_gpu_ceilings_are_measured_once_per_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(common.tempfile, "gettempdir", lambda: str(tmp_path))
    runs = []
    monkeypatch.setattr(common, "_measure_ceilings",
                        lambda device: runs.append(device) or {"copy_tbps": 3.0, "fp32_tflops": 50.0, "bf16_tflops": 700.0})
    a = common._gpu_ceilings("NVIDIA H100 80GB HBM3")
    b = common._gpu_ceilings("NVIDIA H100 80GB HBM3")
    assert a == b and runs == ["cuda"]
    common._gpu_ceilings("NVIDIA H200")  # another GPU: measured again
    assert runs == ["cuda", "cuda"]
    assert json.loads((tmp_path / "effssl_bench_gpu_ceilings.json").read_text())["key"].startswith("NVIDIA H200")
    # An hour later, or after a reboot, measured again: a ceiling measured on a busy GPU must
    # not stay (until 2026-12-06 the cache never expired, so "rerun on an idle machine" reused it)
    now = common.time.time()
    monkeypatch.setattr(common.time, "time", lambda: now + common.CEILINGS_MAX_AGE_S + 1)
    common._gpu_ceilings("NVIDIA H200")
    assert runs == ["cuda"] * 3
    common._gpu_ceilings("NVIDIA H200")
    assert runs == ["cuda"] * 3
    monkeypatch.setattr(common, "_boot_id", lambda: "another boot")
    common._gpu_ceilings("NVIDIA H200")
    assert runs == ["cuda"] * 4


def test_device_info_on_a_gpu_uses_measured_ceilings(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(common, "_gpu_ceilings", lambda name: {"copy_tbps": 3.0, "fp32_tflops": 50.0,
                                                               "bf16_tflops": 700.0})
    info = common.device_info("cuda")
    assert (info["fp32_tflops_limit"], info["bf16_tflops_limit"], info["hbm_tbps_limit"]) == (50.0, 700.0, 3.0)
    assert (info["fp32_tflops_spec"], info["hbm_tbps_spec"]) == (66.9, 3.35)

    def broken(name):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(common, "_gpu_ceilings", broken)
    info = common.device_info("cuda")  # the benchmarks still run, on the spec sheet's numbers
    assert info["fp32_tflops_limit"] == 66.9 and "measuring failed: RuntimeError" in info["limit_source"]


@pytest.mark.parametrize("argv,msg", [(["--device", "cuda:0"], "invalid choice: 'cuda:0'"),
                                      (["--device", "gpu"], "invalid choice: 'gpu'")])
def test_device_flag_is_cpu_or_cuda(argv, msg, capsys):
    # anything else (e.g. "cuda:0") was filed and timed as a CPU run
    with pytest.raises(SystemExit):
        common.parse_args("doc", "quick", argv)
    assert msg in capsys.readouterr().err


@without_gpu
def test_cuda_flag_without_a_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        common.parse_args("doc", "quick", ["--device", "cuda"])
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_check_output_flags_a_wrong_answer():
    from bench.common import check_output

    w = torch.tensor([1.0, 2.0, float("inf")])
    assert check_output({}, w.clone(), w, 0.0) == {"max_err": 0.0}
    r = check_output({"note": "x"}, torch.tensor([1.0, 2.1, float("inf")]), w, 1e-2)
    assert r["max_err"] == pytest.approx(0.05) and r["note"].startswith("MISMATCH") and r["note"].endswith("; x")
    for bad in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, float("nan"), float("inf")]), w[:2]):
        assert check_output({}, bad, w, 1.0)["max_err"] == float("inf")
    n = torch.tensor([20.0, float("nan"), float("inf")])
    assert check_output({}, n.clone(), n, 0.0) == {"max_err": 0.0}  # NaN where the reference has it
    assert check_output({}, torch.tensor([20.0, 1.0, float("inf")]), n, 1.0)["max_err"] == float("inf")
    # tuples compare element by element
    assert check_output({}, (w, w[:1] + 1), (w, w[:1]), 1e-3)["note"].startswith("MISMATCH")


def test_rates_above_the_measured_limit_are_flagged(tmp_path, capsys):
    # a CPU ceiling measured while another process ran came out at 0.03 TFLOP/s and a kernel's
    # row then read 132% of the limit, silently
    import argparse

    rows = [{"case": "a", "pct_fp32_limit": 132.0},
            {"case": "b", "pct_fp32_limit": 99.0, "note": "x"},
            {"case": "c", "pct_copy_bw": 101.0, "note": "failed? no"},
            {"case": "d", "pct_copy_bw": None},
            {"case": "yardstick", "pct_copy_bw": 100.00000000000001}]
    args = argparse.Namespace(out=str(tmp_path), quick=False, device="cpu")
    path = common.report(args, "t", "title", {}, rows, ["case", "pct_fp32_limit", "note"])
    assert "2 row(s) above 100% of a measured limit" in capsys.readouterr().out
    got = json.load(open(path))["rows"]
    assert got[0]["note"] == common.OVER_LIMIT_NOTE
    assert got[1]["note"] == "x" and "note" not in got[3] and "note" not in got[4]
    assert got[2]["note"] == "failed? no; " + common.OVER_LIMIT_NOTE
    assert common.flag_over_limit(got) == 2 and got[0]["note"] == common.OVER_LIMIT_NOTE  # once


def test_every_json_writer_flags_rates_above_the_limit(tmp_path, capsys):
    # photometric's main and a partial (SIGTERM) run write JSON without report(): write_json flags
    import bench.bench_photometric as bp

    rows = [{"case": "c", "provider": "ours", "median_ms": 1.0, "pct_copy_bw": 150.0}]
    common.write_json(str(tmp_path / "a.json"), {}, [dict(r) for r in rows])
    assert json.load(open(tmp_path / "a.json"))["rows"][0]["note"] == common.OVER_LIMIT_NOTE
    orig = bp.run, bp.step_share
    bp.run, bp.step_share = (lambda d, q: ([dict(r) for r in rows], {"device": "cpu"})), (lambda d, q, live=None: [])
    try:
        path = bp.main(["--device", "cpu", "--out", str(tmp_path / "p")])
    finally:
        bp.run, bp.step_share = orig
    assert json.load(open(path))["rows"][0]["note"] == common.OVER_LIMIT_NOTE
    assert "above 100% of a measured limit" in capsys.readouterr().out


def test_the_cpu_limit_is_not_rounded(monkeypatch):
    # rounded to 2 decimals, a CPU's 0.0349 TFLOP/s became 0.03 (every pct_* 16% high) and
    # anything below 0.005 became 0 (a ZeroDivisionError that ended the suite)
    monkeypatch.setattr(common, "_gemm_tflops", lambda *a, **k: 0.0349)
    info = common.device_info("cpu")
    assert info["fp32_tflops_limit"] == 0.0349 and info["bench_device"] == "cpu"
    assert common.pct_of(0.0349, info["fp32_tflops_limit"]) == pytest.approx(100.0)
    for bad in (0.0, None, float("nan")):
        assert common.pct_of(1.0, bad) is None
    assert common.fmt_limit(0.0349) == "0.0349" and common.fmt_limit(66.9) == "66.9"
    assert common.fmt_limit(float("nan")) == "unknown"
    assert common.pct_hbm({"hbm_tbps_limit": 2.0}, 1000.0) == pytest.approx(50.0)
    assert common.pct_hbm({"hbm_tbps_limit": None}, 1000.0) is None


def test_a_users_backend_is_dropped_with_a_note(monkeypatch, capsys):
    # some benchmarks dropped EFFSSL_BACKEND and some did not, so "ours" timed the reference
    # alone and the default kernels after gather_tokens; now every one drops it, saying so
    import os

    monkeypatch.setenv("EFFSSL_BACKEND", "reference")
    common.parse_args("doc", "quick", ["--device", "cpu"])
    assert "EFFSSL_BACKEND" not in os.environ
    assert "EFFSSL_BACKEND=reference ignored" in capsys.readouterr().out
    monkeypatch.setenv("EFFSSL_BACKEND", "auto")
    common.parse_args("doc", "quick", ["--device", "cpu"])
    assert "ignored" not in capsys.readouterr().out


def test_gpu_timer_median_is_the_middle_sample(monkeypatch):
    import triton.testing

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    _FakeEvent.elapsed = 1.0
    # 5 samples, sorted 1, 2, 3, 4, 100: the median is 3 (the mean would be 22)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, return_mode: [100.0, 1.0, 3.0, 2.0, 4.0])
    assert common.time_ms(lambda: None, "cuda")["median_ms"] == 3.0
    # 4 samples, sorted 1, 2, 4, 100: the median is (2 + 4) / 2 = 3, not the upper middle 4
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, return_mode: [100.0, 1.0, 4.0, 2.0])
    assert common.time_ms(lambda: None, "cuda")["median_ms"] == 3.0


def test_ceilings_against_hand_counts(monkeypatch):
    # GEMM: n x n x n is n^3 FMAs = 2 n^3 FLOP at its fastest (p20) time. n=100 in 1 ms:
    # 2e6 / 1e-3 = 2e9 FLOP/s = 0.002 TFLOP/s; n=200 in 16 ms: 1.6e7 / 1.6e-2 = 0.001 TFLOP/s;
    # the best size (100) is the ceiling. Copy of 1000 float32: 4000 B read + 4000 B written
    # = 8000 B in 1 ms = 8e6 B/s = 8e-6 TB/s.
    def fake_time_ms(fn, device, **kw):
        out = fn()
        ms = {100: 1.0, 200: 16.0}.get(out.shape[0], 1.0) if out.dim() == 2 else 1.0
        return {"p20_ms": ms, "median_ms": 99.0}

    monkeypatch.setattr(common, "time_ms", fake_time_ms)
    assert common._gemm_tflops("cpu", torch.float32, (100, 200)) == pytest.approx(0.002)
    assert common._measure_ceilings("cpu", copy_numel=1000, gemm_sizes=(100,))["copy_tbps"] == pytest.approx(8e-6)


def test_check_output_takes_the_worst_tensor_and_the_sign_of_inf():
    from bench.common import check_output

    # a tuple's worst tensor counts, not its last: |1.1 - 1| / 1 = 0.1, then an exact one
    r = check_output({}, (torch.tensor([1.1]), torch.tensor([2.0])), (torch.tensor([1.0]), torch.tensor([2.0])), 1e-3)
    assert r["max_err"] == pytest.approx(0.1) and r["note"].startswith("MISMATCH")
    # -inf where the reference has +inf is wrong
    inf = float("inf")
    assert check_output({}, torch.tensor([1.0, -inf]), torch.tensor([1.0, inf]), 1.0)["max_err"] == inf
