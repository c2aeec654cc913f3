#!/usr/bin/env bash
# GPU validation in one call of under 8 minutes, no network. Steps, in priority order, each in its
# own time slot (seconds, a cap: a step that ends early leaves its time to the later ones):
#
#   build           120  pip install --no-build-isolation --no-deps -e . (the extension with CUDA)
#   a_tests_cuda     90  the CUDA tests the CPU cannot stand in for: the kernels, the dispatch, CUDA
#                        graphs (GPU_CHECK_TESTS; the full suite runs in CI); a crash gets a
#                        native backtrace (a2_backtrace, 45 s, only then) and the run goes on
#   b_attention      60  benchmarks attention_core (3 model shapes x fwd, fwd+bwd x mask none /
#                        whole rows x eager, triton, sdpa, sdpa forced to cuDNN / flash /
#                        efficient, auto) and decode_step
#   tune_dispatch    80  python -m benchmarks.tune --dispatch: orca_kernels/_dispatch_table.py
#   c_module_layer   90  gated_cross_attention and decoder_layer+injection: eager, compiled, orca,
#                        orca+compiled (shapes in GPU_CHECK_MODULE_SHAPES order)
#   d_train_step     70  model_train_step eager and orca with the profiler table, then orca+compiled
#   e1_train_memory  60  the cost model's predicted peak memory of the training step (Qwen3-0.6B B32:
#                        reference, fused, fused + checkpointing) against the card's measured one
#   e2_decode_compiled 45 model_generate at Qwen3-0.6B (B1, B8): eager, orca and orca+compiled
#                        (generate(compile=True)), time to first token and tokens/s
#   sanitizer        40  compute-sanitizer memcheck over benchmarks.sanitize, if time remains
#
# One deadline for the whole script (GPU_CHECK_BUDGET_S, default 450 s): a step gets its slot or
# what is left of the deadline (less a 10 s reserve), and is skipped when under 15 s are left.
# Every step writes one line to summary.txt: what it did, what it skipped, the time it took.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # rehearsal on a CPU machine with the GPU machine's
#                                            # stack: build, test collection, every benchmark step
#                                            # listed (cases, providers), every slot, the hooks
#   bash benchmarks/gpu_check.sh --plan      # print the steps and slots; run nothing
#
# Files: the steps write into $WORK (GPU_CHECK_WORK, default a fresh folder under /tmp, removed at
# the end); after every step $OUT (default ./gpu-out, ./gpu-out-dry for a dry run) is refreshed
# with at most six files, as the device tool returns eight: summary.txt, env.txt, gpu_check.tgz
# (everything in $WORK: logs, the results JSON/CSV/plots, the profile), the benchmark results
# JSON (one file: the steps' runs merge into it), the profiler table and the measured
# _dispatch_table.py.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --plan) MODE=plan ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --plan]" >&2; exit 2 ;;
esac
DRY_RUN=0
[ "$MODE" = dry ] && DRY_RUN=1

BUDGET=${GPU_CHECK_BUDGET_S:-450}
RESERVE=10   # seconds kept for the summary and the bundle
MIN_SLOT=15  # a step offered less than this is skipped
# The CUDA tests of step a: the Triton kernels, the extension's CUDA kernels, the attention
# dispatch, decode steps and CUDA-graph capture, inductor's CUDA code around the ops. Not the
# compile audit (tests/test_gpu_compile.py: it compiles for sm_80/sm_90 without a GPU, in CI).
TESTS_CUDA=${GPU_CHECK_TESTS:-"tests/test_flash_attention.py tests/test_dispatch.py tests/test_decode_step.py \
tests/test_cross_attention.py tests/test_table_cache.py tests/test_strided_conv.py tests/test_rope.py \
tests/test_ortho_loss.py tests/test_gated_residual.py tests/test_inductor_compile.py"}
# The CPU parametrisations of those files run in CI: only the rest here.
TESTS_K=${GPU_CHECK_TESTS_K:-not cpu}
MODULE_SHAPES=${GPU_CHECK_MODULE_SHAPES:-qwen3-0.6b,qwen3-4b,llama3.1-8b}

# name:slot:what, in the order the steps run.
PLAN=(
  "build:120:pip install --no-build-isolation --no-deps -e . and an assertion that _C has CUDA"
  "a_tests_cuda:90:pytest -n 8 -k '$TESTS_K' on the CUDA tests ($(echo $TESTS_CUDA | wc -w) files)"
  "a2_backtrace:45:only after a crash in a_tests_cuda: cuda-gdb backtrace of the crashed test"
  "b_attention:60:benchmarks.run --only attention_core,decode_step"
  "tune_dispatch:80:benchmarks.tune --dispatch (writes orca_kernels/_dispatch_table.py)"
  "c_module_layer:90:benchmarks.run --only gated_cross_attention,decoder_layer+injection --shapes $MODULE_SHAPES"
  "d_train_step:70:benchmarks.run --only model_train_step --providers eager,orca,orca+compiled --profile"
  "e1_train_memory:60:benchmarks.cost --model qwen3-0.6b --batch 32 --measure (predicted vs measured peak memory)"
  "e2_decode_compiled:45:benchmarks.run --only model_generate --shapes qwen3-0.6b (eager, orca, orca+compiled: ttft, tokens/s)"
  "sanitizer:40:compute-sanitizer --tool memcheck over benchmarks.sanitize, if time remains"
)

print_plan() {
  local entry total=0
  echo "gpu_check plan: a $BUDGET s deadline (GPU_CHECK_BUDGET_S), slots are caps"
  for entry in "${PLAN[@]}"; do
    IFS=: read -r name slot what <<< "$entry"
    printf '  %-19s %4s s  %s\n' "$name" "$slot" "$what"
    total=$(( total + slot ))
  done
  echo "  (slots add up to $total s; a2_backtrace only runs after a crash)"
}

if [ "$MODE" = plan ]; then
  print_plan
  exit 0
fi

OUT=${OUT:-$([ "$DRY_RUN" = 1 ] && echo ./gpu-out-dry || echo ./gpu-out)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK"
START=$(date +%s)
STATUS=0
# The interpreter that holds torch: `python` where it exists, else `python3` (the GPU machine
# has only python3). A real executable, not a shell function, so cuda-gdb can run it.
PY=$(command -v python 2>/dev/null || command -v python3)
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
note() { echo "$*" | tee -a "$WORK/summary.txt"; }
slot_of() { local entry; for entry in "${PLAN[@]}"; do [ "${entry%%:*}" = "$1" ] && { IFS=: read -r _ s _ <<< "$entry"; echo "$s"; return; }; done; echo 0; }

# begin NAME: sets STEP, CAP (the slot, or what is left less the reserve) and STEP_START; returns
# 1 (after a summary line) when too little time is left to start it.
begin() {
  STEP=$1
  local slot l
  slot=$(slot_of "$1")
  l=$(( $(left) - RESERVE ))
  CAP=$(( l < slot ? l : slot ))
  STEP_START=$(date +%s)
  echo "== $STEP (slot $slot s, cap $CAP s, $(left) s of the deadline left)"
  if [ "$CAP" -lt "$MIN_SLOT" ]; then
    note "$STEP: skipped: no time left ($(left) s of the $BUDGET s deadline)"
    return 1
  fi
}
# finish TEXT: the step's summary line, with the time it took of its slot.
finish() { note "$STEP: $* ($(( $(date +%s) - STEP_START )) s of a $(slot_of "$STEP") s slot)"; sync_out; }

# $OUT gets at most six files (the device tool returns eight): see the header.
sync_out() {
  cp "$WORK/summary.txt" "$WORK/env.txt" "$OUT/" 2>/dev/null
  tar czf "$OUT/gpu_check.tgz.part" -C "$WORK" . 2>/dev/null && mv "$OUT/gpu_check.tgz.part" "$OUT/gpu_check.tgz"
  local newest
  newest=$(ls -t "$WORK"/*.json 2>/dev/null | head -1)
  [ -n "$newest" ] && cp "$newest" "$OUT/"
  newest=$(ls -t "$WORK"/*-profile.txt 2>/dev/null | head -1)
  [ -n "$newest" ] && cp "$newest" "$OUT/"
  [ -f "$WORK/_dispatch_table.py" ] && cp "$WORK/_dispatch_table.py" "$OUT/"
  return 0
}

# skipped_in LOG: what a benchmarks.run log says it skipped, in a few words.
skipped_in() {
  local n reasons
  n=$(grep -m1 -o '^skipped [0-9]* case(s) or provider(s)' "$1" | grep -o '[0-9]*')
  if [ -z "$n" ]; then echo "skipped nothing"; return; fi
  reasons=$(grep -A1000 '^skipped [0-9]* case' "$1" | grep '^  ' | sed 's/.*: //' | sort | uniq -c | sed 's/^ *//' | paste -sd ',' | sed 's/,/, /g')
  echo "skipped $n case(s)/provider(s): $reasons (see $STEP.log)"
}

# bench OPS MARGIN [run.py args...]: one benchmarks.run invocation in the current step's slot; it
# starts no provider after CAP - MARGIN seconds (a provider that compiles takes up to ~MARGIN).
bench() {
  local ops=$1 margin=$2 log="$WORK/$STEP.log" code
  shift 2
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" -m benchmarks.run --device cuda --full --list --only "$ops" "$@" > "$log" 2>&1
    code=$?
    if [ "$code" -eq 3 ]; then
      finish "skipped: not implemented (no benchmark case op $ops)"
    elif [ "$code" -eq 0 ]; then
      cat "$log"; finish "listed $(tail -1 "$log") (dry run: not run)"
    else
      tail -20 "$log"; finish "LISTING FAILED (exit status $code, see $STEP.log)"; STATUS=1
    fi
    return
  fi
  local budget=$(( CAP - margin ))
  [ "$budget" -lt 5 ] && budget=5
  # SIGINT at the cap: run.py has written every provider it finished; -k: a hang is killed.
  timeout -s INT -k 15 "$CAP" "$PY" -m benchmarks.run --full --only "$ops" --budget-s "$budget" \
    --out "$WORK" "$@" > "$log" 2>&1
  code=$?
  grep -A100 "^op " "$log" | head -60
  if [ "$code" -eq 3 ]; then
    finish "skipped: not implemented (no benchmark case op $ops)"
  elif [ "$code" -eq 124 ]; then
    finish "CUT SHORT by its slot (the providers it finished are in the results); $(skipped_in "$log")"
  else
    finish "exit status $code; $(grep -c '^\[[0-9]*/[0-9]*\]' "$log") case(s) started; $(skipped_in "$log")"
    [ "$code" -ne 0 ] && STATUS=1
  fi
}

: > "$WORK/summary.txt"
{
  date -u
  git rev-parse HEAD 2>/dev/null || echo "git sha unknown"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi (no GPU)"
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
  "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>/dev/null
  nvcc --version 2>/dev/null | tail -1
  [ "$DRY_RUN" = 1 ] && echo "dry run"
  echo "work folder: $WORK; deadline: $BUDGET s"
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt"
print_plan | tee "$WORK/plan.txt"

# ------------------------------------------------------------------------------------- build
begin build || { sync_out; exit 1; }
# --no-build-isolation --no-deps: build against the torch that is there, fetch nothing.
if ! timeout "$CAP" "$PY" -m pip install --no-build-isolation --no-deps -e . > "$WORK/build.log" 2>&1; then
  tail -40 "$WORK/build.log"
  finish "FAILED (see build.log)"
  exit 1
fi
if "$PY" -c "import orca_kernels._extension as e; assert e.WITH_CUDA, 'built without CUDA'" >> "$WORK/build.log" 2>&1; then
  finish "ok, extension with CUDA"
else
  tail -5 "$WORK/build.log"
  finish "FAILED: the extension was built without CUDA"
  exit 1
fi

# ----------------------------------------------------------------------- a: the CUDA tests
tests=()
for f in $TESTS_CUDA; do [ -f "$f" ] && tests+=("$f"); done
if begin a_tests_cuda; then
  if [ "$DRY_RUN" = 1 ]; then
    # No TRITON_INTERPRET and no GPU: the CUDA parametrisations are empty here; collecting the
    # whole suite proves every test module imports on this stack.
    if timeout "$CAP" "$PY" -m pytest -q -p no:cacheprovider --collect-only tests > "$WORK/a_tests_cuda.log" 2>&1; then
      chosen=0
      for f in "${tests[@]}"; do chosen=$(( chosen + $(grep "^$f::" "$WORK/a_tests_cuda.log" | grep -vc cpu) )); done
      finish "collected $(grep -c '::' "$WORK/a_tests_cuda.log") tests; -k '$TESTS_K' keeps $chosen of the" \
        "${#tests[@]} CUDA files' here, plus their CUDA parametrisations on a GPU (dry run: not run)"
    else
      tail -20 "$WORK/a_tests_cuda.log"; finish "COLLECTION FAILED"; STATUS=1
    fi
  else
    # No TRITON_INTERPRET: the Triton tests run on CUDA, the extension tests on CPU and CUDA.
    # SIGINT at the cap makes pytest stop and still print its summary.
    xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
    timeout -s INT -k 15 "$CAP" "$PY" -m pytest -q -p no:cacheprovider $xdist -rfE -k "$TESTS_K" "${tests[@]}" \
      > "$WORK/a_tests_cuda.log" 2>&1
    code=$?
    tail -5 "$WORK/a_tests_cuda.log"
    result=$(grep -E '(passed|failed|error)' "$WORK/a_tests_cuda.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    if [ "$code" -eq 124 ]; then
      finish "CUT SHORT by its slot: ${result:-no summary}"
    else
      finish "exit status $code: ${result:-no summary}"
    fi
    [ "$code" -ne 0 ] && STATUS=1
  fi
fi

# a2: a test that died on a signal (an xdist worker crash, or the bad-input child of
# tests/bad_op_calls.py) gets a native backtrace, and the run goes on.
crashed=""
if [ "$DRY_RUN" = 0 ] && [ -f "$WORK/a_tests_cuda.log" ]; then
  crashed=$(grep -o "worker '[a-z0-9]*' crashed while running '[^']*'" "$WORK/a_tests_cuda.log" | head -1 | sed "s/.*running '//; s/'\$//")
  grep -q "exit status -[0-9]* at" "$WORK/a_tests_cuda.log" && crashed=${crashed:-bad_op_calls}
fi
if [ -n "$crashed" ]; then
  if ! command -v cuda-gdb > /dev/null; then
    STEP=a2_backtrace; STEP_START=$(date +%s); finish "skipped: $crashed crashed, but cuda-gdb is not installed"
  elif begin a2_backtrace; then
    if [ "$crashed" = bad_op_calls ]; then
      target=(tests/bad_op_calls.py)  # the test's calls, each announced before it runs
    else
      target=(-m pytest -q -p no:cacheprovider -x "$crashed")
    fi
    timeout "$CAP" cuda-gdb -batch -ex run -ex bt --args "$PY" "${target[@]}" > "$WORK/crash_backtrace.txt" 2>&1
    finish "$crashed crashed; native backtrace in crash_backtrace.txt"
  fi
elif [ "$DRY_RUN" = 1 ]; then
  STEP=a2_backtrace; STEP_START=$(date +%s); finish "dry run: runs only after a crash in a_tests_cuda"
fi

# ------------------------------------------------------------- b: the attention core, decode
begin b_attention && bench attention_core,decode_step 15

# ----------------------------------------------------------------- the attention dispatch table
if begin tune_dispatch; then
  if ! "$PY" -m benchmarks.tune --help 2>/dev/null | grep -q -- --dispatch; then
    finish "skipped: not implemented (benchmarks.tune has no --dispatch)"
  elif [ "$DRY_RUN" = 1 ]; then
    if "$PY" -m benchmarks.tune --dispatch --dry-run > "$WORK/tune_dispatch.log" 2>&1; then
      finish "listed $(grep -c . "$WORK/tune_dispatch.log") dispatch cases (dry run: not measured)"
    else
      tail -20 "$WORK/tune_dispatch.log"; finish "LISTING FAILED"; STATUS=1
    fi
  else
    timeout -s INT -k 15 "$CAP" "$PY" -m benchmarks.tune --dispatch --budget-s $(( CAP - 20 )) \
      > "$WORK/tune_dispatch.log" 2>&1
    code=$?
    tail -5 "$WORK/tune_dispatch.log"
    cp orca_kernels/_dispatch_table.py "$WORK/_dispatch_table.py" 2>/dev/null
    measured=$(grep -c '^\[[0-9]*/[0-9]*\]' "$WORK/tune_dispatch.log")
    unmeasured=$(grep -o '[0-9]* cases left unmeasured' "$WORK/tune_dispatch.log")
    [ "$code" -eq 124 ] && code="124 (CUT SHORT by its slot)"
    finish "exit status $code: $measured case(s) measured${unmeasured:+, skipped: $unmeasured}; table in _dispatch_table.py"
    [ "$code" != 0 ] && STATUS=1
  fi
fi

# ------------------------------------------------------------------ c: the module and the layer
begin c_module_layer && bench gated_cross_attention,decoder_layer+injection 30 --shapes "$MODULE_SHAPES"

# ------------------------------------------------------- d: the training step, with its profile
begin d_train_step && bench model_train_step 25 --providers eager,orca,orca+compiled --profile

# ------------------------------------------------------------ e: slots for work not written yet
if begin e1_train_memory; then
  # The cost model's prediction of the training step's peak memory against the card's measured one.
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" -m benchmarks.cost --help > "$WORK/e1_train_memory.log" 2>&1 \
      && finish "would run: benchmarks.cost --model qwen3-0.6b --batch 32 --measure (dry run: not run)" \
      || { tail -5 "$WORK/e1_train_memory.log"; finish "FAILED to load benchmarks.cost"; STATUS=1; }
  else
    timeout -s INT -k 15 "$CAP" "$PY" -m benchmarks.cost --model qwen3-0.6b --batch 32 \
      --variants reference,fused,fused+ckpt --measure --no-plot --out "$WORK/cost" > "$WORK/e1_train_memory.log" 2>&1
    code=$?
    grep -i "predicted" "$WORK/e1_train_memory.log" | tail -6
    [ "$code" -eq 124 ] && code="124 (CUT SHORT by its slot)"
    finish "exit status $code; predicted vs measured peaks in cost/ and e1_train_memory.log"
    [ "$code" != 0 ] && STATUS=1
  fi
fi
begin e2_decode_compiled && bench model_generate 10 --shapes qwen3-0.6b

# ------------------------------------------------------------------------ compute-sanitizer
if begin sanitizer; then
  if [ "$DRY_RUN" = 1 ] || ! command -v compute-sanitizer > /dev/null; then
    why=$([ "$DRY_RUN" = 1 ] && echo "dry run" || echo "compute-sanitizer not found here")
    "$PY" -m benchmarks.sanitize --list > "$WORK/sanitizer.log" 2>&1
    finish "skipped: $why; would run memcheck on: $(paste -sd ';' "$WORK/sanitizer.log")"
  else
    timeout "$CAP" compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m benchmarks.sanitize \
      > "$WORK/sanitizer.log" 2>&1
    code=$?
    tail -12 "$WORK/sanitizer.log"
    [ "$code" -eq 124 ] && finish "CUT SHORT by its slot" || finish "exit status $code"
    [ "$code" -ne 0 ] && [ "$code" -ne 124 ] && STATUS=1
  fi
fi

note "total: $(( $(date +%s) - START )) s of a $BUDGET s deadline; status $STATUS; everything in gpu_check.tgz"
sync_out
[ -z "${GPU_CHECK_WORK:-}" ] && rm -rf "$WORK"  # a folder of our own: all of it is in gpu_check.tgz
exit "$STATUS"
