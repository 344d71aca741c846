#!/usr/bin/env bash
# One prepared run on a single-GPU machine with no network (at most 7.5 min):
#   1. the gpu-marked tests (TE vs local spec parity, bf16 and fp8 distillation steps, save on
#      SIGUSR1 + exact resume with CUDA RNG and optimizer state);
#   2. the distillation-step benchmark at Llama-3.1-8B -> 4.5B shapes (bench/gpu_distill.py).
# Figures go to $OUT (default gpu_check_out/). Wheels the machine lacks (scripts/gpu_wheels.sh
# downloads the pinned ones, ~41 MB) can be passed in $WHEELS (a folder): installed with --no-index
# --no-deps first (the image's CUDA torch stays), then the stack is import-checked. Without CUDA
# it skips, exit 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$OUT"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here: skipped (CPU fallback mode; nothing to measure)"
  echo '{"skipped": "no CUDA device"}' > "$OUT/gpu_check.json"
  exit 0
fi
if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
  "$PY" -m pip install --no-index --no-deps --no-cache-dir "$WHEELS"/*.whl >"$OUT/pip.log" 2>&1 \
    || { echo "gpu_check: installing $WHEELS failed (see $OUT/pip.log)"; exit 1; }
fi
"$PY" - > "$OUT/versions.json" <<'PY' || { echo "gpu_check: the stack does not import; pass the wheels (scripts/gpu_wheels.sh) in WHEELS"; exit 1; }
import importlib.metadata as md, json, sys, torch
import megatron.core, modelopt.torch.distill, modelopt.torch.prune, transformers  # noqa: F401
names = ["torch", "megatron-core", "nvidia-modelopt", "transformers", "transformer-engine"]
v = {}
for n in names:
    try:
        v[n] = md.version(n)
    except md.PackageNotFoundError:
        v[n] = None
print(json.dumps({"python": sys.version.split()[0], "cuda": torch.version.cuda, **v}))
PY
cat "$OUT/versions.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
status=0
timeout 270 "$PY" -m pytest -q -m gpu tests/gpu --junitxml="$OUT/gpu_tests.xml" \
  2>&1 | tee "$OUT/gpu_tests.log" || status=1
timeout 180 "$PY" bench/gpu_distill.py --json "$OUT/gpu_bench.json" 2>&1 \
  | tail -n 60 > "$OUT/gpu_bench.log" || status=1
cat "$OUT/gpu_bench.json" 2>/dev/null
exit $status
