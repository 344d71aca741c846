#!/usr/bin/env bash
# make setup: the project's virtual environment, from the public package index.
#
#   bash scripts/setup_venv.sh VENV PYTHON TORCH TE TE_KIT
#
# PYTHON  the interpreter to build the venv from ("" = the first of python3.12, python3.11
#         that runs). Supported: CPython 3.12 and 3.11 on Linux x86_64 or aarch64.
# TORCH   auto | cpu | cuda. auto: cuda where `nvidia-smi -L` lists a GPU, else cpu.
#         cpu:  the CPU build from PyTorch's CPU wheel index (TORCH_INDEX overrides it, e.g. a
#               mirror); where that index cannot be reached, the default index's build of the
#               same version (on Linux x86_64 that is the CUDA build, ~2.5 GB, which runs on a
#               CPU too).
#         cuda: the default index's build (PyPI: CUDA 13.0 for torch 2.13), or TORCH_INDEX
#               (e.g. https://download.pytorch.org/whl/cu126 for an older driver).
# TE      auto | pip | none. auto: pip on a cuda venv, none on a cpu one. pip: Transformer
#         Engine from the index (its core wheel, plus its torch extension compiled against this
#         torch: needs nvcc and cuDNN headers). TE_KIT=<folder> installs an offline kit
#         (scripts/te_kit.py) instead.
# Every other package is pinned in requirements.txt / requirements.lock; torch's version comes
# from the lock, never with a local-version label, so the same pin serves both builds.
set -euo pipefail
VENV=${1:?venv folder}; PYTHON=${2:-}; TORCH=${3:-auto}; TE=${4:-auto}; TE_KIT=${5:-}
cd "$(dirname "$0")/.."
say() { echo "setup: $*"; }
die() { echo "setup: $*" >&2; exit 2; }

if [ -z "$PYTHON" ]; then
  for p in python3.12 python3.11; do
    if "$p" -c 'import sys, venv; assert sys.version_info[:2] in ((3, 11), (3, 12))' \
        >/dev/null 2>&1; then PYTHON=$p; break; fi
  done
  [ -n "$PYTHON" ] || die "no python3.12 or python3.11 runs here: install one (e.g. apt-get \
install python3.12-venv) or name it, make setup PYTHON=/path/to/python3.12"
fi
ver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
  || die "PYTHON=$PYTHON does not run"
case "$ver" in 3.11|3.12) ;; *) die "PYTHON=$PYTHON is Python $ver; the stack supports 3.12 \
and 3.11 (megatron-core 0.19, torch 2.13): make setup PYTHON=python3.12";; esac

case "$TORCH" in
  auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'
        then TORCH=cuda; else TORCH=cpu; fi ;;
  cpu|cuda) ;;
  *) die "TORCH=$TORCH: use TORCH=cpu, TORCH=cuda or TORCH=auto" ;;
esac
case "$TE" in
  auto) if [ "$TORCH" = cuda ]; then TE=pip; else TE=none; fi ;;
  pip|none) ;;
  *) die "TE=$TE: use TE=pip, TE=none or TE=auto" ;;
esac
torch_pin=$(grep -E '^torch==' requirements.lock | cut -d' ' -f1)
case "$torch_pin" in
  torch==*+*) die "requirements.lock pins $torch_pin, a local-version label no public index \
serves: pin torch==${torch_pin#torch==} without it" ;;
  torch==*) ;;
  *) die "requirements.lock pins no torch==<version>" ;;
esac

CPU_INDEX=https://download.pytorch.org/whl/cpu
reachable() {  # an index answers within 15 s
  "$PYTHON" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=15).read(1)
EOF
}
torch_args=()
if [ -n "${TORCH_INDEX:-}" ]; then
  torch_args=(--extra-index-url "$TORCH_INDEX")
  why="from $TORCH_INDEX"
elif [ "$TORCH" = cpu ] && reachable "$CPU_INDEX"; then
  torch_args=(--extra-index-url "$CPU_INDEX")  # its +cpu build sorts above the index's own
  why="the CPU build, from $CPU_INDEX"
elif [ "$TORCH" = cpu ]; then
  why="the default index's build ($CPU_INDEX did not answer; on Linux x86_64 this is the CUDA \
build, which also runs on a CPU; TORCH_INDEX=<mirror of it> to get the CPU one)"
else
  why="the default index's CUDA build"
fi
say "Python $ver ($PYTHON), $torch_pin for $TORCH: $why; Transformer Engine: \
${TE_KIT:+the kit $TE_KIT}${TE_KIT:-$TE}"

"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/pip" install -q)
"${pip[@]}" --upgrade pip
"${pip[@]}" "${torch_args[@]}" "$torch_pin" -c requirements.lock
"${pip[@]}" -r requirements.txt -c requirements.lock
# megatron-core declares Python >= 3.12; its cp311 wheel works on 3.11 (the flag for it alone:
# on other packages it makes pip pick 3.12-only releases)
"${pip[@]}" --no-deps --ignore-requires-python -r requirements-engine.txt
"${pip[@]}" --no-deps --no-build-isolation -e .
if [ -n "$TE_KIT" ]; then
  "$VENV/bin/python" scripts/te_kit.py install --kit "$TE_KIT"
elif [ "$TE" = pip ]; then
  te=$(grep -E '^transformer-engine' requirements-gpu.txt | cut -d' ' -f1)
  if ! "${pip[@]}" --no-build-isolation "$te" -c requirements.lock; then
    die "Transformer Engine ($te) did not install: its torch extension compiles here and needs \
nvcc and cuDNN's headers (CUDA_HOME). Install the CUDA toolkit, or build an offline kit on any \
machine (make te-kit, see docs/gpu.md) and rerun make setup TE_KIT=.te-kit; TE=none sets up \
without it (bf16 on megatron's local layer spec, no fp8)"
  fi
fi
"$VENV/bin/python" -c "import torch; print('setup: torch', torch.__version__, 'CUDA', \
torch.version.cuda, 'GPUs', torch.cuda.device_count())"
