#!/usr/bin/env bash
# GPU validation in one call, no network: build, the tests on CUDA, the benchmark suite,
# compute-sanitizer on one small call of every kernel. Everything lands in $OUT (default
# ./gpu-out) as it is produced: env.txt, build.log, tests.log, bench.log, the suite's JSON/CSV
# (rewritten after every case) and plots, sanitizer.log, summary.txt.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine (the whole call < 8 min)
#   bash benchmarks/gpu_check.sh --dry-run   # rehearsal on a CPU machine with the GPU machine's
#                                            # stack: every step but the GPU work, which is listed
#
# The device tool returns at most 8 files, fewer than a run writes; bundle them:
#   R=$OUT; OUT=/tmp/gc bash benchmarks/gpu_check.sh; tar czf $R/gpu_check.tgz -C /tmp/gc .; cp /tmp/gc/summary.txt $R/
#
# Time: one deadline for the whole script (GPU_CHECK_BUDGET_S, default 450 s); each step gets
# its cap or what is left, and a step that the deadline cuts short says so in summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT=${OUT:-$([ "$DRY_RUN" = 1 ] && echo ./gpu-out-dry || echo ./gpu-out)}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
STATUS=0
# The interpreter that holds torch: `python` where it exists, else `python3` (the GPU machine
# has only python3). A real executable, not a shell function, so cuda-gdb can run it.
PY=$(command -v python 2>/dev/null || command -v python3)

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# cap SECONDS [RESERVE]: SECONDS, or what is left of the budget after RESERVE seconds.
cap() { local l=$(( $(left) - ${2:-0} )); [ "$l" -lt "$1" ] && echo $(( l > 5 ? l : 5 )) || echo "$1"; }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

{
  date -u
  git rev-parse HEAD 2>/dev/null || echo "git sha unknown"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi (no GPU)"
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>/dev/null
  nvcc --version 2>/dev/null | tail -1
  [ "$DRY_RUN" = 1 ] && echo "dry run"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== build"
# --no-build-isolation --no-deps: build against the torch that is there, fetch nothing.
if ! timeout "$(cap 180 120)" "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  note "build: FAILED (see build.log)"
  exit 1
fi
if "$PY" -c "import orca_kernels._extension as e; assert e.WITH_CUDA, 'built without CUDA'" >> "$OUT/build.log" 2>&1; then
  note "build: ok, extension with CUDA ($(( $(date +%s) - START )) s)"
else
  tail -5 "$OUT/build.log"
  note "build: FAILED: the extension was built without CUDA"
  exit 1
fi

echo "== tests"
if [ "$DRY_RUN" = 1 ]; then
  # No TRITON_INTERPRET and no GPU: the CUDA parametrisations are empty here; collecting proves
  # every test module imports on this stack.
  if "$PY" -m pytest -q -p no:cacheprovider --collect-only tests > "$OUT/tests.log" 2>&1; then
    note "tests: collected $(grep -c '::' "$OUT/tests.log") tests (dry run: not run)"
  else
    tail -20 "$OUT/tests.log"; note "tests: COLLECTION FAILED"; STATUS=1
  fi
else
  # No TRITON_INTERPRET: the Triton tests run on CUDA, the extension tests on CPU and CUDA.
  xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  timeout "$(cap 150 150)" "$PY" -m pytest -q -p no:cacheprovider $xdist tests > "$OUT/tests.log" 2>&1
  code=$?
  [ "$code" -eq 124 ] && note "tests: CUT SHORT by the time cap" || note "tests: exit status $code"
  tail -5 "$OUT/tests.log"
  [ "$code" -ne 0 ] && STATUS=1
  # A bad-input call of the compiled ops that died on a signal: its native backtrace.
  if grep -q "exit status -[0-9]* at" "$OUT/tests.log" && command -v cuda-gdb > /dev/null; then
    # The test's calls (tests/bad_op_calls.py), each announced before it runs.
    timeout "$(cap 60 150)" cuda-gdb -batch -ex run -ex bt --args "$PY" tests/bad_op_calls.py \
      > "$OUT/crash_backtrace.txt" 2>&1
    note "tests: a compiled op crashed on bad input; native backtrace in crash_backtrace.txt"
  fi
fi

echo "== benchmarks"
if [ "$DRY_RUN" = 1 ]; then
  if "$PY" -m benchmarks.run --device cuda --full --list > "$OUT/bench.log" 2>&1; then
    cat "$OUT/bench.log"; note "benchmarks: $(tail -1 "$OUT/bench.log") (dry run: listed)"
  else
    tail -20 "$OUT/bench.log"; note "benchmarks: LISTING FAILED"; STATUS=1
  fi
else
  # run.py stops starting cases when its budget is spent and lists what it skipped; the outer
  # timeout only catches a case that hangs.
  budget=$(( $(left) - 75 ))
  timeout $(( budget + 60 )) "$PY" -m benchmarks.run --full --budget-s "$budget" --out "$OUT" > "$OUT/bench.log" 2>&1
  code=$?
  grep -A100 "^op " "$OUT/bench.log" | head -80
  grep -A40 "time budget" "$OUT/bench.log"
  note "benchmarks: exit status $code$(grep -q 'time budget' "$OUT/bench.log" && echo ', some cases skipped (time budget)')"
  [ "$code" -ne 0 ] && STATUS=1
fi

echo "== compute-sanitizer"
if ! command -v compute-sanitizer > /dev/null; then
  "$PY" -m benchmarks.sanitize --list > "$OUT/sanitizer.log" 2>&1
  note "sanitizer: compute-sanitizer not found here; would run memcheck on: $(paste -sd ';' "$OUT/sanitizer.log")"
elif [ "$DRY_RUN" = 1 ]; then
  "$PY" -m benchmarks.sanitize --list > "$OUT/sanitizer.log" 2>&1
  note "sanitizer: dry run; would run memcheck on: $(paste -sd ';' "$OUT/sanitizer.log")"
else
  timeout "$(cap 60)" compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m benchmarks.sanitize > "$OUT/sanitizer.log" 2>&1
  code=$?
  tail -12 "$OUT/sanitizer.log"
  [ "$code" -eq 124 ] && note "sanitizer: CUT SHORT by the time cap" || note "sanitizer: exit status $code"
  [ "$code" -ne 0 ] && [ "$code" -ne 124 ] && STATUS=1
fi

note "total: $(( $(date +%s) - START )) s of a $BUDGET s budget; status $STATUS"
exit "$STATUS"
