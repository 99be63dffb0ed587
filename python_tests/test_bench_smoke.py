"""Smoke run of every benchmark (README's main job) at toy sizes on the CPU: each one runs all its
providers, prints its table and writes its JSON, and no provider fails or mismatches, so a change
that breaks a benchmark shows here rather than on a lent GPU. ``EFFSSL_BENCH_TINY=1`` (see
bench/common.py) shrinks the sizes; the numbers mean nothing and are not checked.
bench_photometric has its own, closer test (test_bench_photometric.py)."""
import importlib
import json

import pytest
import torch

pytest.importorskip("rich")
pytest.importorskip("torchvision")

from bench import common
from bench.__main__ import BENCHMARKS

NAMES = [m.split(".bench_", 1)[1] for m in BENCHMARKS if not m.endswith("photometric")]
NEEDS = {"vit_step": "timm", "simwnw_step": "timm"}
# the kernel benchmarks check ours' answer at the timed shape (a max_err on its rows)
CHECKED = {"block_match", "gather_tokens", "patch_embed_gather", "halo_gather", "sparse_conv", "multi_crop"}
# those with a % of the FP32 limit: a CPU GEMM rate of 0 (unmeasurable) leaves it out, no crash
FP32_PCT = {"block_match": "pct_fp32_limit", "patch_embed_gather": "pct_limit", "tcr_loss": "pct_fp32_limit"}


@pytest.mark.parametrize("name", NAMES)
def test_bench_runs_every_provider(name, tmp_path, monkeypatch):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    monkeypatch.setenv("EFFSSL_BENCH_TINY", "1")
    monkeypatch.setenv("EFFSSL_BACKEND", "reference")  # dropped: "ours" is the device's default
    if name in FP32_PCT:
        monkeypatch.setattr(common, "_gemm_tflops", lambda *a, **k: 0.0)
    mod = importlib.import_module(f"bench.bench_{name}")
    path = mod.main(["--device", "cpu", "--out", str(tmp_path)])
    assert path == str(tmp_path / f"{name}.json")
    d = json.loads((tmp_path / f"{name}.json").read_text())
    assert d["info"]["tiny"] is True and d["info"]["quick"] is True and d["info"]["torch"] == torch.__version__
    rows = d["rows"]
    assert rows
    bad = common.problem_rows(rows)  # what makes `python -m bench` exit 1
    assert not bad, bad
    timed = [r for r in rows if "median_ms" in r]
    assert timed and all(r["median_ms"] > 0 for r in timed)
    assert d["info"]["effssl_backend"] == "auto" and d["info"]["bench_device"] == "cpu"
    if name in CHECKED:
        assert any("max_err" in r for r in timed), "ours' answer is not checked"
    if name in FP32_PCT:
        assert d["info"]["fp32_tflops_limit"] == 0.0
        assert all(r.get(FP32_PCT[name]) is None for r in rows)
    # the rows were collected in live_rows(), which a SIGTERM (a time limit) writes out
    # partially; once the JSON is written, nothing rewrites it
    live = common._LIVE.get("rows")
    assert live is not None and len(live) == len(rows) and "target" not in common._LIVE
    if name == "sparse_conv":  # masked dense is an alternative too: the speedup plot sees it
        packed = [r for r in rows if r["provider"] == "ours packed"]
        assert packed and all("speedup_vs_masked dense" in r and "speedup_vs_dense" in r for r in packed)


def test_tiny_run_needs_out(monkeypatch):
    monkeypatch.setenv("EFFSSL_BENCH_TINY", "1")
    from bench import bench_tcr_loss

    with pytest.raises(SystemExit):  # never over the committed results
        bench_tcr_loss.main(["--device", "cpu"])
