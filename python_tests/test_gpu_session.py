"""bench/gpu_session.sh runs the GPU tests on a lent GPU, which no CI run has: every test file
with CUDA cases must be in its lists, or those cases would never run anywhere."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "bench" / "gpu_session.sh").read_text()
# a test file has CUDA cases if it uses one of these (python_tests/utils.py's markers, or cuda tensors)
GPU_MARKERS = re.compile(r'requires_gpu|HAS_GPU|_TRITON_GPU|device="cuda"|torch\.cuda\.is_available')


def _listed(var: str) -> set[str]:
    m = re.search(rf'^{var}="([^"]*)"', SCRIPT, re.M)
    assert m, f"gpu_session.sh has no {var}"
    return set(m.group(1).split())


def test_listed_files_exist():
    for var in ("GPU_TESTS", "GPU_CASES", "SANITIZE_TESTS"):
        for f in _listed(var):
            assert (ROOT / f).is_file(), f"{var} names {f}, which does not exist"


def test_every_file_with_cuda_cases_runs_on_the_gpu():
    listed = _listed("GPU_TESTS") | _listed("GPU_CASES")
    with_cuda = {f"python_tests/{p.name}" for p in (ROOT / "python_tests").glob("test_*.py")
                 if p.name != pathlib.Path(__file__).name and GPU_MARKERS.search(p.read_text())}
    assert with_cuda, "the markers match no test file: the pattern is stale"
    assert with_cuda <= listed, f"not in GPU_TESTS or GPU_CASES: {sorted(with_cuda - listed)}"
    assert _listed("SANITIZE_TESTS") <= listed


def _dry_run(tmp_path, *stages, test_rc=0, report_rc=0):
    """Run gpu_session.sh with a fake ``python`` that records its arguments and a fake ``pip``
    that fails (the CUDA build check passes, so nothing is built; were it to fail, nothing would
    be either); returns the recorded calls, one argument list each. ``test_rc``: pytest's exit;
    ``report_rc``: bench.report's (it prints "report broke" when not 0)."""
    import os
    import subprocess

    shim = tmp_path / "bin"
    shim.mkdir(parents=True)
    calls = tmp_path / "calls"
    (shim / "python").write_text(
        f'#!/usr/bin/env bash\nprintf "%s\\x1f" "$@" >> "{calls}"\necho >> "{calls}"\n'
        f'[ "$2" = pytest ] && exit {test_rc}\n'
        f'[ "$2" = bench.report ] && [ {report_rc} != 0 ] && {{ echo "report broke"; exit {report_rc}; }}\nexit 0\n')
    (shim / "pip").write_text("#!/usr/bin/env bash\necho 'pip must not run in a dry run'\nexit 1\n")
    for f in ("python", "pip"):
        (shim / f).chmod(0o755)
    # PY: the interpreter the script runs everything with (its `python` and `pip` shims)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "LOGS": str(tmp_path / "logs"), "DEADLINE": "120", "PY": str(shim / "python")}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), *stages], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    recorded = [line.split("\x1f")[:-1] for line in (calls.read_text() if calls.exists() else "").splitlines()]
    return r, recorded


def test_gpu_tests_stage_runs_every_listed_file(tmp_path):
    r, calls = _dry_run(tmp_path, "gpu-tests")
    assert r.returncode == 0, r.stdout + r.stderr
    pytests = [c for c in calls if c[:2] == ["-m", "pytest"]]
    assert len(pytests) == 2, calls
    assert _listed("GPU_TESTS") <= set(pytests[0]) and "-k" not in pytests[0]
    i = pytests[1].index("-k")
    assert pytests[1][i + 1] == "cuda" and _listed("GPU_CASES") <= set(pytests[1])
    assert "Permission denied" not in (tmp_path / "logs" / "gpu_tests.log").read_text()
    assert (tmp_path / "out" / "logs.tgz").is_file()


def test_a_failing_test_run_fails_the_stage(tmp_path):
    r, calls = _dry_run(tmp_path, "gpu-tests", test_rc=1)
    assert r.returncode == 1 and "failed: gpu_tests(1)" in r.stdout, r.stdout
    assert len([c for c in calls if c[:2] == ["-m", "pytest"]]) == 2  # the second run still ran


def test_bench_stage_runs_one_process_per_benchmark(tmp_path):
    r, calls = _dry_run(tmp_path, "bench:tcr_loss,multi_crop")
    assert r.returncode == 0, r.stdout + r.stderr
    benches = [c for c in calls if c[:2] == ["-m", "bench"]]
    # the plan's order, not the argument's
    assert [c[c.index("--only") + 1] for c in benches] == ["multi_crop", "tcr_loss"]
    assert all(c[c.index("--device") + 1] == "cuda" for c in benches)
    # JSON only per benchmark; report.md once at the end (it cost seconds per stage before)
    assert all("--no-report" in c for c in benches)
    assert [c for c in calls if c[:2] == ["-m", "bench.report"]] == [["-m", "bench.report", "bench/results/gpu"]]
    r, _ = _dry_run(tmp_path / "again", "bench:nope")
    assert r.returncode == 2 and "unknown benchmark nope" in r.stdout


def test_a_failing_report_comes_back_in_the_logs(tmp_path):
    import tarfile

    r, _ = _dry_run(tmp_path, "bench:tcr_loss", report_rc=1)
    assert "bench.report failed" in r.stdout and "report broke" in r.stdout, r.stdout
    with tarfile.open(tmp_path / "out" / "logs.tgz") as t:
        log = t.extractfile("./report.log").read().decode()
    assert "report broke" in log


def test_a_misspelt_benchmark_is_refused_before_any_stage(tmp_path):
    r, calls = _dry_run(tmp_path, "gpu-tests", "bench:block_match,simwnw")
    assert r.returncode == 2 and "unknown benchmark simwnw" in r.stdout
    assert calls == []  # not even the build check: nothing ran


def test_an_empty_benchmark_list_is_refused(tmp_path):
    for i, stage in enumerate(("bench:", "bench:,")):  # not read as "the whole plan"
        r, calls = _dry_run(tmp_path / str(i), stage)
        assert r.returncode == 2 and "names no benchmark" in r.stdout, r.stdout
        assert calls == []


def test_the_plan_is_the_suite():
    import bench.__main__ as suite

    plan = [item.split(":")[0] for item in re.search(r'^BENCH_PLAN="([^"]*)"', SCRIPT, re.M).group(1).split()]
    assert len(plan) == len(set(plan))
    assert set(plan) == {m.split(".bench_", 1)[1] for m in suite.BENCHMARKS}, "a benchmark no GPU session runs"


def test_the_first_calls_plan_fits_its_time():
    # `all`: ~90 s build, 100 s of GPU tests, then the issues' benchmarks (up to photometric)
    # inside DEADLINE 560, with ~2 s a stage for process start and archives and the 15 s reserve
    plan = re.search(r'^BENCH_PLAN="([^"]*)"', SCRIPT, re.M).group(1).split()
    limits = dict(item.split(":") for item in plan)
    first = list(limits)[: list(limits).index("photometric") + 1]
    assert sum(int(limits[n]) for n in first) + 2 * len(first) + 15 <= 560 - 90 - 100
