#!/usr/bin/env bash
# Download, here, the wheels scripts/gpu_check.sh needs on a GPU machine with CUDA PyTorch and no
# network (the lent H200 image: Python 3.12, torch, numpy, scipy, pytest, tensorboard 2.21.0...
# but no megatron-core, ModelOpt or OmegaConf, and older transformers / huggingface_hub). Versions
# come from requirements.lock / requirements-engine.txt, so the GPU runs the pinned stack.
#   bash scripts/gpu_wheels.sh [DEST=.whl] [PYTHON_VERSION=3.12]
#   then there: WHEELS=.whl bash scripts/gpu_check.sh   (they install with --no-deps)
# PuLP keeps only its Linux x86-64 CBC solver (16.4 -> 3.2 MB). With KIT=<a te_kit folder>, the
# wheels that kit carries are left out (it installs them where missing), so that the kit and the
# wheels travel in one 64 MiB transfer: then pass both, TE_KIT and WHEELS, to gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYV=${2:-3.12}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# what the recipe imports that such an image lacks (each with its own missing requirements)
NEED="megatron-core nvidia-modelopt omegaconf PuLP pydantic pydantic_core annotated-types
typing-inspection transformers huggingface_hub tokenizers httpx2 httpcore2 truststore"
pins=()
for n in $NEED; do
  pin=$(grep -ihE "^${n//[-_]/[-_]}==" requirements.lock requirements-engine.txt | head -n 1)
  [ -n "$pin" ] || { echo "gpu_wheels: $n is not pinned in requirements.lock" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p "$DEST"
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do plat+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${plat[@]}" -d "$DEST" "${pins[@]}"
"$PY" scripts/trim_wheel.py "$DEST"/pulp-*.whl --drop 'pulp/solverdir/cbc/*' 'pulp/tests/*' \
  --keep 'pulp/solverdir/cbc/linux/i64/*'
if [ -n "${KIT:-}" ]; then
  [ -f "$KIT/manifest.json" ] || { echo "gpu_wheels: KIT=$KIT holds no te_kit manifest.json" >&2; exit 1; }
  for f in $("$PY" -c 'import json, sys; print(*json.load(open(sys.argv[1]))["files"])' "$KIT/manifest.json"); do
    if [ -f "$DEST/$f" ]; then rm "$DEST/$f"; echo "gpu_wheels: $f left out: $KIT carries it"; fi
  done
fi
du -ch "$DEST"/*.whl | tail -n 1
