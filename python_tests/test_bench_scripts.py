"""The training scripts bench/train_digits.py and bench/demo_schedule.py on tiny runs (so they do
not rot), and their flags: a bad one is a usage error before any work."""
import json
import os

import pytest
import torch

from bench import demo_schedule, train_digits  # the repository root is on pythonpath (pyproject.toml)
from utils import without_gpu


def test_train_digits_tiny_run(tmp_path, capsys):
    res = train_digits.main(["--device", "cpu", "--steps", "2", "--batch", "4", "--width", "2",
                             "--eval-every", "1", "--minutes", "0", "--out", str(tmp_path)])
    assert res["steps_done"] == 2 and not res["stopped_by_minutes_guard"]
    assert res["same_first_views"]  # both runs trained on the same views
    for name in ("dense", "simwnw"):
        run = res["runs"][name]
        assert len(run["loss"]) == len(run["step_s"]) == 2
        assert [e["step"] for e in run["evals"]] == [0, 1, 2]
        assert all(0.0 <= e["knn_acc"] <= 1.0 for e in run["evals"])
    # the sparsified copy outside block_mask is the dense network: same random-init kNN
    assert res["runs"]["dense"]["evals"][0] == res["runs"]["simwnw"]["evals"][0]
    assert len(res["runs"]["simwnw"]["removal_per_step"]) == 2
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == json.loads(json.dumps(res))
    assert os.path.getsize(tmp_path / "curves.png") > 0
    assert "simwnw" in capsys.readouterr().out


def test_demo_schedule_tiny_run(tmp_path):
    threads = torch.get_num_threads()
    try:
        path = demo_schedule.main(["--device", "cpu", "--steps", "4", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # --threads sets the process's: give it back to the suite
    with open(path) as f:
        res = json.load(f)
    assert res["info"]["steps"] == 4 and "steps" not in res["info"]["config"]  # one step count
    runs = [(r["run"], r["stage"]) for r in res["rows"]]
    assert runs == [("baseline", s) for s in range(4)] + [("schedule", s) for s in range(4)]
    assert sum(r["steps"] for r in res["rows"] if r["run"] == "schedule") == 4
    assert all(r["train_loss"] == r["train_loss"] and r["eval_loss"] > 0 for r in res["rows"])
    assert [e["chosen"] for e in res["estimates"]].count(True) == 4  # one setting per checkpoint


@pytest.mark.parametrize("script,argv,msg", [
    (train_digits, ["--eval-every", "0"], "--eval-every: must be at least 1, got 0"),
    (train_digits, ["--batch", "1"], "--batch: must be at least 2, got 1"),
    (train_digits, ["--steps", "-3"], "--steps: must be at least 1, got -3"),
    (train_digits, ["--width", "two"], "--width: expected an integer, got 'two'"),
    (train_digits, ["--minutes", "-1"], "--minutes must be a finite number >= 0"),
    (train_digits, ["--base-lr", "nan"], "--base-lr must be a finite number > 0"),
    (train_digits, ["--device", "cuda:0"], "invalid choice: 'cuda:0'"),
    (demo_schedule, ["--steps", "0"], "--steps: must be at least 4, got 0"),
    (demo_schedule, ["--threads", "0"], "--threads: must be at least 1, got 0"),
])
def test_bad_flags_are_usage_errors(script, argv, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        script.main(argv + ["--out", str(tmp_path)])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing ran


@without_gpu
@pytest.mark.parametrize("script", [train_digits, demo_schedule])
def test_cuda_without_a_gpu_is_a_usage_error(script, capsys, tmp_path):
    with pytest.raises(SystemExit):
        script.main(["--device", "cuda", "--out", str(tmp_path)])
    assert "torch sees no CUDA device" in capsys.readouterr().err
