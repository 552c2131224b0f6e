#!/usr/bin/env bash
# The GPU checks of issue 22 in one run, on a machine with a CUDA GPU:
#   1. the card (nvidia-smi) and torch's view of it            -> card.txt
#   2. the CUDA tests (pytest -m gpu) and the device tests      -> tests.log
#   3. make bench's GPU section (python -m benchmarks --only gpu) -> gpu_bench.md, bench.log
#   4. the block for docs/performance.md, the card named        -> performance_gpu.md
# Everything lands in $OUT (default /tmp/gpu_check). Exit status: 0 when the tests passed
# and the section ran, 1 when something failed, 2 when there is no usable CUDA torch.
#
#   PYTHON=...  an interpreter with a CUDA torch and fl-app's dependencies (default: the
#               first of .venv/bin/python and python3 whose torch sees a CUDA device)
#   QUICK=1     the quick benchmark (one model, fewer clients): about 2 minutes, not 6
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

py=""
for cand in "${PYTHON:-}" .venv/bin/python python3; do
  [ -n "$cand" ] || continue
  if "$cand" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    py=$cand
    break
  fi
done
if [ -z "$py" ]; then
  echo "gpu_check: no interpreter with a CUDA torch that sees a GPU (set PYTHON=...)" >&2
  nvidia-smi -L >&2 || true
  exit 2
fi
if ! "$py" -c "import fl_app, flwr, opacus, hydra, dp_accounting" 2>"$out/imports.log"; then
  echo "gpu_check: $py lacks fl-app's dependencies (pip install -e '.[dev]'):" >&2
  cat "$out/imports.log" >&2
  exit 2
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'devices', torch.cuda.device_count(), torch.cuda.get_device_name(0))"
} | tee "$out/card.txt"
card=$(head -n 1 "$out/card.txt" | cut -d, -f1)

status=0
# The CUDA tests, then the rest of the device tests (auto resolves to cuda:0 here).
"$py" -m pytest tests/test_device.py tests/test_benchmarks.py -q -p no:cacheprovider -rA \
  -k "device or gpu or resnet" 2>&1 | tee "$out/tests.log" || status=1
grep -q "SKIPPED.*gpu marker" "$out/tests.log" && { echo "gpu_check: a gpu test skipped" >&2; status=1; }

"$py" -m benchmarks --only gpu ${QUICK:+--quick} --out "$out/gpu_bench.md" 2>&1 \
  | tee "$out/bench.log" || status=1

{
  echo "## GPU: DP-SGD on CUDA, noise from the CPU keystream, clients per second"
  echo
  echo "$(date -u +%Y-%m-%d), ${card}, \`scripts/gpu_check.sh\`${QUICK:+ (QUICK=1)}; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
  echo
  # The section's own table and notes, without the document's title and environment.
  sed -n '/^### GPU/,$p' "$out/gpu_bench.md"
} > "$out/performance_gpu.md"
cat "$out/performance_gpu.md"
exit $status
