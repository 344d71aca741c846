#!/usr/bin/env bash
# Megatron-Bridge for the interop tests, into its own folder (default .bridge/): the pinned wheels
# of requirements-bridge.txt, --no-deps (everything else comes from the project's .venv). Cached:
# redone only when requirements-bridge.txt changes. tests/stages/test_bridge.py skips, naming
# this script, where the folder is missing.
#   bash scripts/bridge_env.sh [DEST=.bridge]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.bridge}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
stamp="$DEST/.requirements-bridge.txt"
if [ -f "$stamp" ] && cmp -s "$stamp" requirements-bridge.txt; then
  echo "bridge_env: $DEST is up to date"; exit 0
fi
pins=$(grep -oE '^[A-Za-z0-9_.-]+==[^ ]+' requirements-bridge.txt)
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
for pin in $pins; do
  py=()
  # the Bridge wheel declares Python >= 3.12: fetch it as a 3.12 (pure-Python) wheel
  [[ $pin == megatron-bridge==* ]] && py=(--python-version 3.12 --implementation py)
  "$PY" -m pip download -q --no-deps --only-binary=:all: "${py[@]}" -d "$wheels" "$pin"
done
rm -rf "$DEST.tmp"
"$PY" -m pip install -q --no-deps --ignore-requires-python --no-compile --target "$DEST.tmp" \
  "$wheels"/*.whl
cp requirements-bridge.txt "$DEST.tmp/.requirements-bridge.txt"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
echo "bridge_env: $(ls "$wheels" | wc -l) wheels in $DEST"
