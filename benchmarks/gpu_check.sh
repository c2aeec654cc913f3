#!/usr/bin/env bash
# GPU validation in one call (no network): build, the test suite on CUDA, the full benchmark suite.
# Everything that matters lands in $OUT (default ./gpu-out): env.txt, build.log, tests.log,
# bench.log and the suite's JSON/CSV/PNG. Budget: under 8 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"

{
  date -u
  git rev-parse HEAD 2>/dev/null || echo "git sha unknown"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== build"
if ! pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
python -c "import orca_kernels._extension as e; assert e.WITH_CUDA, 'built without CUDA'; print('extension with CUDA')" 2>&1 | tee -a "$OUT/build.log"

echo "== tests (CUDA and CPU)"
# No TRITON_INTERPRET: the Triton tests run on CUDA, the extension tests on CPU and CUDA.
timeout 200 python -m pytest -q -p no:cacheprovider tests > "$OUT/tests.log" 2>&1
echo "tests exit status $?" | tee -a "$OUT/tests.log"
tail -5 "$OUT/tests.log"

echo "== benchmarks"
timeout 330 python -m benchmarks.run --full --out "$OUT" > "$OUT/bench.log" 2>&1
echo "benchmarks exit status $?" | tee -a "$OUT/bench.log"
grep -A100 "^op " "$OUT/bench.log" | head -80
