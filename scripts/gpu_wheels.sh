#!/usr/bin/env bash
# Download, here, the wheels scripts/gpu_check.sh needs on a GPU machine with CUDA PyTorch and no
# network (the lent H200 image: Python 3.12, torch, numpy, scipy, pytest... but no megatron-core,
# ModelOpt or OmegaConf, and older transformers / huggingface_hub). Versions come from
# requirements.lock / requirements-engine.txt, so the GPU runs the pinned stack.
#   bash scripts/gpu_wheels.sh [DEST=.whl] [PYTHON_VERSION=3.12]
#   then there: WHEELS=.whl bash scripts/gpu_check.sh   (they install with --no-deps)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYV=${2:-3.12}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# what the recipe imports that such an image lacks (each with its own missing requirements)
NEED="megatron-core nvidia-modelopt omegaconf PuLP pydantic pydantic_core annotated-types
typing-inspection transformers huggingface_hub tokenizers httpx2 httpcore2 truststore tensorboard"
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
du -ch "$DEST"/*.whl | tail -n 1
