#!/usr/bin/env bash
# The project's pinned stack on top of an NVIDIA image, without touching the image's torch (a CUDA
# build Transformer Engine is compiled against). Run by docker/Dockerfile in the repository root.
# The image's torch version becomes a constraint, so a pin that needs another torch fails here
# instead of pulling a CUDA wheel from PyPI that breaks TE.
set -euo pipefail
PYTHON=${PYTHON:-python}
work=$(mktemp -d)
"$PYTHON" -c "import torch; print(f'torch=={torch.__version__}')" > "$work/image-constraints.txt"
grep -v '^torch==' requirements.txt > "$work/requirements.txt"
"$PYTHON" -m pip install --no-cache-dir -c "$work/image-constraints.txt" -r "$work/requirements.txt"
"$PYTHON" -m pip install --no-cache-dir --no-deps -r requirements-engine.txt
rm -rf "$work"
