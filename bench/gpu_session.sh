#!/usr/bin/env bash
# The owed GPU checks in one or two device calls. A lent GPU machine keeps nothing between calls,
# a call may run 600 s and a session has 15 minutes of device time in all (the machine's start
# included), so every stage builds first (skipped when the CUDA build is already there), stays
# inside one deadline, and leaves its logs and results under $OUT as it goes (as archives: at
# most 8 files come back from $OUT): logs.tgz (one log per stage), results_gpu.tgz, train_gpu.tgz.
#
#   bash bench/gpu_session.sh STAGE [STAGE ...]
#
#   all        build, gpu-tests (<= 100 s), then the benchmarks of the issues' targets (BENCH_PLAN,
#              their limits add up to the deadline with a ~90 s build): the first call of a session
#   gpu-tests  the tests that need a GPU (pytest-xdist, 8 workers, where installed): the three CUDA
#              block_match kernels, every Triton kernel on hardware, cuDNN on tiles, no-host-sync
#              counts, photometric/multi_crop/SimWnW on CUDA
#   sanitize   compute-sanitizer memcheck, racecheck and initcheck on the CUDA kernels' tests
#   suite      the whole test suite (the CPU tests too, on this machine's torch)
#   bench[:a,b,...]  python -m bench --device cuda, one benchmark per process (all, or those named)
#              -> bench/results/gpu, archived as $OUT/results_gpu.tgz after each one
#   train      bench.train_digits + bench.demo_schedule  -> $OUT/train_gpu.tgz
#
# The machine gets the working tree without .git: pass the commit for the results' JSON,
# `EFFSSL_GIT_SHA=<git describe --always --dirty --exclude='*' here, typed in> bash bench/gpu_session.sh all`
# (commit first: the machine runs the working tree, uncommitted changes included; "-dirty" says so).
# A benchmark stopped at its time limit writes the cases it finished (its JSON says "partial").
#
# DEADLINE (seconds from the start, default 560) bounds every stage, so the call returns its logs
# before a 600 s timeout_s. Plan for a session: call 1 `all` (timeout_s 600: ~10 of the 15 minutes
# with the start); then, at once so the machine is still warm, `DEADLINE=150 bash
# bench/gpu_session.sh bench:sparse_conv,halo_gather,...` for what `all` did not reach (sparse_conv:
# issue 3's tile_conv vs cuDNN), or `sanitize` (compute-sanitizer refused gVisor machines' GPU in
# 2026-11: "Device not supported"), with DEADLINE = that call's timeout_s - 30; give_back.
# Unpack the archives at the repository root (they hold bench/results/gpu/; a later call's holds
# only its own benchmarks), run `python -m bench.report bench/results/gpu` for one report.md over
# all, commit them, then fill in the README's GPU tables. The last lines of each stage's log are printed: a call returns
# its tail.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
DEADLINE=${DEADLINE:-560}
OUT=${OUT:-/tmp/effssl_gpu_out}
LOGS=${LOGS:-/tmp/effssl_gpu_logs}
mkdir -p "$OUT" "$LOGS"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export EFFSSL_FORCE_CUDA=1 EFFSSL_EXPECT_CUDA=1
unset TRITON_INTERPRET
# The device image's interpreter with torch is python3 (/opt/torch/.venv/bin/python3); a `python`
# on the PATH may be another one, or none. Shims on the PATH (scripts, not links: a link to a
# venv's interpreter loses the venv) make every `python` and `pip` below, in child processes
# too, that one.
PY=$(command -v "${PY:-python3}") || { echo "no ${PY:-python3} on the PATH"; exit 2; }
SHIMS=$(mktemp -d)
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" >"$SHIMS/python"
printf '#!/bin/sh\nexec "%s" -m pip --disable-pip-version-check "$@"\n' "$PY" >"$SHIMS/pip"
chmod +x "$SHIMS/python" "$SHIMS/pip"
export PATH="$SHIMS:$PATH"

# The GPU-only test files, and the tests that force each CUDA kernel (compute-sanitizer's targets).
GPU_TESTS="python_tests/test_block_match_cuda.py python_tests/test_sparse_cuda.py
  python_tests/test_block_match_triton.py python_tests/test_gather_tokens_triton.py
  python_tests/test_patch_embed_gather_triton.py python_tests/test_multi_crop_triton.py
  python_tests/test_photometric_triton.py python_tests/test_halo_gather.py python_tests/test_tile_conv.py
  python_tests/test_simwnw.py
  python_tests/test_build.py"
# Files of mostly CPU tests with CUDA cases too: only their cases whose id names cuda run here.
GPU_CASES="python_tests/test_block_match.py python_tests/test_gather_tokens.py python_tests/test_transforms.py"
SANITIZE_TESTS="python_tests/test_block_match_cuda.py"
# Benchmarks, each with its time limit: those of the issues' targets first (#2, #3, #4, #5, #7:
# 335 s of the 370 s that `all` has left after a ~90 s build and the tests' 100 s, leaving ~2 s a
# stage for the process start and archives and the last stage's 15 s reserve), then the rest.
BENCH_PLAN="block_match:50 simsiam_step:75 vit_step:40 gather_tokens:30 patch_embed_gather:35
  simwnw_step:45 multi_crop:25 photometric:35 sparse_conv:110 halo_gather:40 emp_ssl_step:50 tcr_loss:40"

FAILED=""  # stages that failed or ran out of time; the script exits 1 if any did
log() { echo "== $(date -u +%H:%M:%S) +$((SECONDS - T0))s $*"; }
left() { echo $((DEADLINE - (SECONDS - T0))); }
keep_logs() { tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; }

build() {
  if python -c "import sys, effssl_kernels._backend as b; sys.exit(0 if b.HAS_CUDA_KERNELS else 1)" 2>/dev/null; then
    return 0
  fi
  log "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  if ! timeout $(($(left) > 30 ? $(left) : 30)) pip install --no-build-isolation --no-deps -e . >"$LOGS/build.log" 2>&1; then
    tail -40 "$LOGS/build.log"
    keep_logs
    exit 1
  fi
  {
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python -m effssl_kernels.info
  } >"$LOGS/env.log" 2>&1
  cat "$LOGS/env.log"
  keep_logs
  log "built"
}

stage() {  # stage NAME LIMIT_S COMMAND...: run until LIMIT_S or the deadline, log to $LOGS/NAME.log, print its tail
  local name=$1 limit=$2 rest
  shift 2
  rest=$(($(left) - 15))  # the kill grace and the archives
  [ "$rest" -lt "$limit" ] && limit=$rest
  if [ "$limit" -lt 15 ]; then
    log "$name skipped: $(left) s left before the deadline"
    FAILED="$FAILED $name(skipped)"
    return 1
  fi
  log "$name (limit ${limit}s)"
  # -k: a process stuck in native code (a hung kernel's sync) ignores SIGTERM's Python handler
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  tail -${TAIL:-25} "$LOGS/$name.log"
  keep_logs
  log "$name exit $rc$([ $rc -eq 124 ] && echo ' (time limit)')"
  [ $rc -eq 0 ] || FAILED="$FAILED $name($rc)"
  return 0
}

gpu_tests() {
  local par=""
  python -c "import xdist" 2>/dev/null && par="-n 8"
  # one stage (one log, one limit), two pytest runs; the lists go in as arguments ($1, $2: word
  # split there), never into the script text, where their newlines would end the command
  stage gpu_tests "${1:-400}" bash -c 'python -m pytest -q -rs $0 --durations=15 $1; a=$?
    python -m pytest -q -rs $0 -k cuda $2; b=$?; exit $((a ? a : b))' "$par" "$GPU_TESTS" "$GPU_CASES"
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

archive_results() {  # $1: the archive under $OUT
  [ -d bench/results/gpu ] && tar czf "$OUT/$1" bench/results/gpu
}

bench() {  # bench [NAME,NAME,...]: those (default: the whole plan), one process each
  local want=${1:-} item name limit w
  for w in ${want//,/ }; do
    [[ " $BENCH_PLAN " == *" $w:"* ]] || { echo "unknown benchmark $w (the plan: $BENCH_PLAN)"; exit 2; }
  done
  for item in $BENCH_PLAN; do
    name=${item%%:*} limit=${item##*:}
    [ -z "$want" ] || [[ ",$want," == *",$name,"* ]] || continue
    # JSON only: report.md and the plots once, below (matplotlib's import and the plots cost
    # seconds each time; a benchmark stopped at its limit writes its finished cases as JSON too)
    TAIL=12 stage "bench_$name" "$limit" python -m bench --device cuda --only "$name" --no-report || continue
    archive_results results_gpu.tgz
  done
  # report.md is rebuilt from the archived JSON at home too (`python -m bench.report`): only
  # where time is left, and never past the deadline
  if [ "$(left)" -gt 45 ]; then
    timeout -k 5 30 python -m bench.report bench/results/gpu >"$LOGS/report.log" 2>&1 \
      || { echo "bench.report failed:"; tail -5 "$LOGS/report.log"; }
    archive_results results_gpu.tgz
    keep_logs  # report.log too: why a report failed comes back
  fi
}

for s in "$@"; do
  case $s in all | gpu-tests | sanitize | suite | bench | train) ;;
    bench:*)  # a misspelt name is refused now, not after the stages before it have run
      # and no name at all too: bench() would read an empty list as the whole plan
      [ -n "$(echo "${s#bench:}" | tr -d ', ')" ] || { echo "$s names no benchmark (the plan: $BENCH_PLAN)"; exit 2; }
      for w in $(echo "${s#bench:}" | tr ',' ' '); do
        [[ " $BENCH_PLAN " == *" $w:"* ]] || { echo "unknown benchmark $w (the plan: $BENCH_PLAN)"; exit 2; }
      done ;;
    *) echo "unknown stage $s (all, gpu-tests, sanitize, suite, bench[:NAMES], train)"; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 2; }
for s in "$@"; do
  build
  case $s in
    all) gpu_tests 100; bench ;;
    gpu-tests) gpu_tests ;;
    sanitize) sanitize ;;
    suite) stage suite 480 python -m pytest -q -rs --durations=15 python_tests ;;
    bench) bench ;;
    bench:*) bench "${s#bench:}" ;;
    train)
      # the minutes guard stops both runs at the same step if 2000 steps do not fit the call
      stage train_digits 330 python -m bench.train_digits --device cuda --minutes 4.5
      stage demo_schedule 120 python -m bench.demo_schedule --device cuda
      archive_results train_gpu.tgz
      ;;
  esac
done
log "done, $(left) s before the deadline"
[ -z "$FAILED" ] || { log "failed:$FAILED"; exit 1; }
