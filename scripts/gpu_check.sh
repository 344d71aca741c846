#!/usr/bin/env bash
# One prepared run on a single-GPU machine with no network (at most 7.5 min):
#   1. the gpu-marked tests (TE vs local spec parity, bf16 and fp8 distillation steps, save on
#      SIGUSR1 + exact resume with CUDA RNG and optimizer state);
#   2. the distillation-step benchmark at Llama-3.1-8B -> 4.5B shapes (bench/gpu_distill.py).
# Figures go to $OUT (default gpu_check_out/). Wheels the machine lacks can be passed in
# $WHEELS (a folder) and are installed with --no-index first. Without CUDA it skips, exit 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
mkdir -p "$OUT"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here: skipped (CPU fallback mode; nothing to measure)"
  echo '{"skipped": "no CUDA device"}' > "$OUT/gpu_check.json"
  exit 0
fi
if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
  "$PY" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl >"$OUT/pip.log" 2>&1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
status=0
timeout 270 "$PY" -m pytest -q -m gpu tests/gpu --junitxml="$OUT/gpu_tests.xml" \
  2>&1 | tee "$OUT/gpu_tests.log" || status=1
timeout 180 "$PY" bench/gpu_distill.py --json "$OUT/gpu_bench.json" 2>&1 \
  | tail -n 60 > "$OUT/gpu_bench.log" || status=1
cat "$OUT/gpu_bench.json" 2>/dev/null
exit $status
