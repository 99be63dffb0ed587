"""cuda_emu itself (python_tests/cuda_emu/cuda_emu.h): small kernels whose behaviour on a GPU is
known, so the emulator that test_block_match_cuda_emu.py trusts is checked too."""
import os
import shutil
import subprocess

import pytest

import cuda_emu

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    return cuda_emu.build_selftest(None, str(tmp_path_factory.mktemp("cuda_emu_selftest")))


def run(binary, mode, order="forward"):
    env = dict(os.environ, CUEMU_ORDER=order, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    return subprocess.run([binary, mode], capture_output=True, text=True, env=env, timeout=300)


def test_race_across_a_shuffle_depends_on_the_order(selftest):
    # Warp 1 writes shared memory, both warps shuffle, warp 0 reads with no __syncthreads: a race.
    # A shuffle releases its warp alone, ahead of the others, so some order reads before the write.
    outs = {o: run(selftest, "race", o).stdout for o in ("forward", "reverse")}
    assert "nan" in outs["forward"] and "nan" not in outs["reverse"], outs


def test_barrier_makes_it_order_independent(selftest):
    outs = {o: run(selftest, "synced", o).stdout for o in ("forward", "reverse", "random:3")}
    assert len(set(outs.values())) == 1 and "nan" not in outs["forward"], outs
    assert outs["forward"].split()[:3] == ["33", "33", "37"]  # s[0] = 32 plus lane 1's 1 ...


def test_indices_are_zero_on_unused_axes(selftest):
    # threadIdx / blockIdx .y .z are 0, blockDim / gridDim .y are 1, as in CUDA
    assert run(selftest, "indices").stdout.split() == ["0", "0", "0", "0", "64", "1", "2", "1"]


def test_shared_memory_reads_nan_before_any_write(selftest):
    assert run(selftest, "uninitialised").stdout.strip().lower() in ("nan", "-nan")


def test_divergent_syncthreads_stops_the_run(selftest):
    proc = run(selftest, "divergent")
    assert proc.returncode != 0 and "divergent __syncthreads" in proc.stderr


def test_launch_limits(selftest):
    out = run(selftest, "limits").stdout
    assert "1056 threads: 1" in out  # cudaErrorInvalidValue
    assert "49 KB without the attribute: 1" in out
    assert "attribute above the opt-in: 1" in out
    assert "49 KB with the attribute: 0, base % 128 = 16" in out  # 16-byte, not 128-byte, aligned
    assert "256 threads, bound 128: 1" in out  # __launch_bounds__


def test_thread_model_reports_the_race_to_tsan(tmp_path):
    if not cuda_emu.sanitizer_available("thread"):
        pytest.skip("g++ here cannot link -fsanitize=thread")
    binary = cuda_emu.build_selftest("thread", str(tmp_path))
    proc = run(binary, "race")
    assert proc.returncode == 66 and "ThreadSanitizer: data race" in proc.stderr
    assert run(binary, "synced").returncode == 0
