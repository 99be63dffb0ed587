#!/usr/bin/env bash
# The owed GPU checks in few device calls. A lent GPU machine keeps nothing between calls and a
# call may run 10 minutes, so every stage builds first (skipped when the CUDA build is already
# there) and writes its log, and its results as one archive, under $OUT:
#
#   bash bench/gpu_session.sh STAGE [STAGE ...]
#
#   gpu-tests  the tests that need a GPU: the three CUDA block_match kernels, every Triton kernel
#              on hardware, cuDNN on tiles, no-host-sync counts, photometric/multi_crop on CUDA
#   sanitize   compute-sanitizer memcheck, racecheck and initcheck on the CUDA kernels' tests
#   suite      the whole test suite (the CPU tests too, on this machine's torch)
#   bench      python -m bench --device cuda            -> $OUT/results_gpu.tgz (bench/results/gpu)
#   train      bench.train_digits + bench.demo_schedule  -> $OUT/train_gpu.tgz
#
# Plan for a 30-minute lease (a call may run 600 s; a cold machine first builds, 8 C++ files and
# one .cu on 16 cores): call 1 `gpu-tests`, call 2 `bench`, call 3 `sanitize`, then `train` if
# time is left. Each stage has a time limit (below) so a call returns its logs. Unpack the
# archives at the repository root (they hold bench/results/gpu/), commit them, then fill in the
# README's GPU tables. The last lines of each stage's log are printed: a call returns its tail.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/effssl_gpu_out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export EFFSSL_FORCE_CUDA=1 EFFSSL_EXPECT_CUDA=1
unset TRITON_INTERPRET

# The GPU-only test files, and the tests that force each CUDA kernel (compute-sanitizer's targets).
GPU_TESTS="python_tests/test_block_match_cuda.py python_tests/test_sparse_cuda.py
  python_tests/test_block_match_triton.py python_tests/test_gather_tokens_triton.py
  python_tests/test_patch_embed_gather_triton.py python_tests/test_multi_crop_triton.py
  python_tests/test_photometric_triton.py python_tests/test_halo_gather.py python_tests/test_simwnw.py
  python_tests/test_build.py"
SANITIZE_TESTS="python_tests/test_block_match_cuda.py"

log() { echo "== $(date -u +%H:%M:%S) $*"; }

build() {
  if python -c "import sys, effssl_kernels._backend as b; sys.exit(0 if b.HAS_CUDA_KERNELS else 1)" 2>/dev/null; then
    return 0
  fi
  log "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  if ! pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    exit 1
  fi
  {
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python -m effssl_kernels.info
  } >"$OUT/env.log" 2>&1
  cat "$OUT/env.log"
}

stage() {  # stage NAME TIMEOUT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, print its tail
  local name=$1 limit=$2
  shift 2
  log "$name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -25 "$OUT/$name.log"
  log "$name exit $rc"
  return 0
}

sanitize() {
  local tool
  for tool in memcheck racecheck initcheck; do
    # memcheck runs every case; racecheck and initcheck (10-100x slower) the cases that reach
    # every kernel and launcher path (odd sizes, borders, flips, NaN, ties) without the random sweep.
    local sel=""
    [ "$tool" = memcheck ] || sel="not test_random"
    stage "sanitize_$tool" $([ "$tool" = memcheck ] && echo 200 || echo 150) compute-sanitizer --tool "$tool" --error-exitcode 99 \
      --target-processes all python -m pytest -x -q $SANITIZE_TESTS -k "$sel"
  done
}

for s in "$@"; do
  case $s in gpu-tests | sanitize | suite | bench | train) ;; *)
    echo "unknown stage $s (gpu-tests, sanitize, suite, bench, train)"; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { sed -n '2,20p' "$0"; exit 2; }
for s in "$@"; do
  build
  case $s in
    gpu-tests) stage gpu_tests 400 python -m pytest -q -rs --durations=15 $GPU_TESTS ;;
    sanitize) sanitize ;;
    suite) stage suite 480 python -m pytest -q -rs --durations=15 python_tests ;;
    bench)
      stage bench 540 python -m bench --device cuda
      tar czf "$OUT/results_gpu.tgz" bench/results/gpu
      ;;
    train)
      # the minutes guard stops both runs at the same step if 2000 steps do not fit the call
      stage train_digits 330 python -m bench.train_digits --device cuda --minutes 4.5
      stage demo_schedule 120 python -m bench.demo_schedule --device cuda
      tar czf "$OUT/train_gpu.tgz" bench/results/gpu
      ;;
  esac
done
