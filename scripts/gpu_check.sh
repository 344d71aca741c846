#!/usr/bin/env bash
# One prepared run on a single-GPU machine with no network ($PARTS: tests,bench by default):
#   tests: the gpu-marked tests (TE vs local spec logits, fused vs unfused TE logits, the first
#      distillation steps' KD loss on the GPU vs the CPU local-spec value, every benchmark run
#      on tiny shapes, the precision-aware optimizer, save on SIGUSR1 + exact resume with CUDA
#      RNG and optimizer state, fp8 reload and export, prune with TE), $TEST_JOBS at once
#      (pytest-xdist, where installed), each under its own pytest timeout, all within $TESTS_S;
#   bench: the distillation-step benchmark at Llama-3.1-8B -> 4.5B shapes (bench/gpu_distill.py,
#      one process per run, alone on the GPU; $BENCH_ARGS, default TE bf16 and TE fp8 at seq
#      4096, or local bf16 without TE; `BENCH_ARGS="--seqs 4096" BENCH_S=400` is the whole
#      matrix at seq 4096);
#   loss: the KD + LM loss of one micro-batch at seq 8192 x Llama-3's 128,256 columns, bf16
#      (bench/kd_loss.py: the Triton vocabulary tiles, the chunks, the whole-logits reference),
#      into kd_loss.json;
#   kit: only the Transformer Engine kit below (a first, short call that carries it).
# A device call runs at most 10 minutes: PARTS=bench and PARTS=tests as two calls fit.
# Writes $OUT (default gpu_check_out/): gpu_check.json (one entry per check), gpu_bench.json
# (always, with the error when the benchmark failed), versions.json, logs. Prints one summary line
# per check. Wheels the machine lacks (scripts/gpu_wheels.sh) can be passed in $WHEELS (a
# folder): installed with --no-index --no-deps first (the image's CUDA torch stays); an offline
# Transformer Engine kit (scripts/te_kit.py, `make te-kit`) in $TE_KIT: its parts verified, the
# machine checked against it, then installed (its prebuilt torch extension, or built here), and
# its kernels run once against torch's (te-kernels).
# PACK_TO=<folder>: on exit, whatever happened, the JSON files there and everything else in $OUT
# as one logs.tgz (a device tool that brings back a few files of one folder).
# Without CUDA it skips, exit 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PARTS=${PARTS:-tests,loss,bench}
TESTS_S=${TESTS_S:-420}     # all gpu tests together
TEST_S=${TEST_S:-180}       # any one test
TEST_JOBS=${TEST_JOBS:-4}   # tests at once
BENCH_S=${BENCH_S:-200}     # the benchmark, all its runs
mkdir -p "$OUT"
pack() {
  [ -n "${PACK_TO:-}" ] || return 0
  mkdir -p "$PACK_TO" && cp "$OUT"/*.json "$PACK_TO"/ 2>/dev/null
  tar czf "$PACK_TO/logs.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
}
trap pack EXIT
summary() {  # summary NAME STATUS DETAIL: one line on stdout, one entry in gpu_check.json
  echo "gpu_check: $1: $2${3:+ ($3)}"
  "$PY" - "$OUT/gpu_check.json" "$1" "$2" "${3:-}" <<'PY'
import json, pathlib, sys
f, name, status, detail = pathlib.Path(sys.argv[1]), *sys.argv[2:]
d = json.loads(f.read_text()) if f.is_file() else {}
d[name] = {"status": status, "detail": detail}
f.write_text(json.dumps(d, indent=2) + "\n")
PY
}
rm -f "$OUT/gpu_check.json"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here: skipped (CPU fallback mode; nothing to measure)"
  echo '{"skipped": "no CUDA device"}' > "$OUT/gpu_check.json"
  echo '{"skipped": "no CUDA device"}' > "$OUT/gpu_bench.json"
  exit 0
fi
if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
  if "$PY" -m pip install --no-index --no-deps --no-cache-dir "$WHEELS"/*.whl >"$OUT/pip.log" 2>&1; then
    summary wheels pass "$(ls "$WHEELS"/*.whl | wc -l) wheels"
  else
    summary wheels fail "see $OUT/pip.log"
    echo '{"error": "wheels did not install"}' > "$OUT/gpu_bench.json"
    exit 1
  fi
fi
if [ -n "${TE_KIT:-}" ] && [ -d "$TE_KIT" ]; then  # scripts/te_kit.py's parts, carried here
  if timeout "${TE_KIT_S:-900}" "$PY" scripts/te_kit.py install --kit "$TE_KIT" \
       --jobs "$(nproc)" >"$OUT/te_kit.log" 2>&1; then
    summary te-kit pass "$(tail -n 1 "$OUT/te_kit.log")"
    # its kernels once against torch's: the slimmed core library holds code this GPU runs
    if timeout 180 "$PY" scripts/te_kit.py kernels >"$OUT/te_kernels.log" 2>&1; then
      summary te-kernels pass "$(tail -n 1 "$OUT/te_kernels.log")"
    else
      summary te-kernels fail "$(tail -n 1 "$OUT/te_kernels.log")"
    fi
  else
    summary te-kit fail "$(tail -n 1 "$OUT/te_kit.log")"
  fi
fi
if [ "$PARTS" = kit ]; then  # the kit alone (a first, short call that carries it)
  [ -f "$OUT/gpu_check.json" ] || summary te-kit fail "PARTS=kit needs a kit: TE_KIT=<its folder>"
  echo '{"skipped": "PARTS=kit"}' > "$OUT/gpu_bench.json"
  grep -q '"fail"' "$OUT/gpu_check.json" && exit 1
  exit 0
fi
if "$PY" - > "$OUT/versions.json" 2>"$OUT/imports.log" <<'PY'
import importlib.metadata as md, json, sys, torch
import megatron.core, modelopt.torch.distill, modelopt.torch.prune, transformers  # noqa: F401
import torch.utils.tensorboard  # noqa: F401  (train.py logs to TensorBoard)
names = ["torch", "megatron-core", "nvidia-modelopt", "transformers", "transformer-engine",
         "transformer-engine-torch", "tensorboard"]
v = {}
for n in names:
    try:
        v[n] = md.version(n)
    except md.PackageNotFoundError:
        v[n] = None
print(json.dumps({"python": sys.version.split()[0], "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name(), **v}))
PY
then
  summary imports pass "$(cat "$OUT/versions.json")"
else
  summary imports fail "the stack does not import: pass scripts/gpu_wheels.sh's wheels in WHEELS; $OUT/imports.log"
  echo '{"error": "the stack does not import"}' > "$OUT/gpu_bench.json"
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
# the signals every process here starts with blocked or ignored (the training stages unblock
# what they watch; an inherited blocked SIGUSR1 kept the preemption tests' signal from the loop)
summary signals info "$("$PY" -c 'import signal as s; b = s.pthread_sigmask(s.SIG_BLOCK, []); i = [n for n in ("SIGUSR1", "SIGTERM") if s.getsignal(getattr(s, n)) == s.SIG_IGN]; print("blocked:", " ".join(sorted(x.name for x in b)) or "none", "ignored:", " ".join(i) or "none")')"
status=0
if [[ ",$PARTS," == *",tests,"* ]]; then
# several tests at once on one GPU (tiny models; pytest-xdist where it is installed), each
# process with its share of the cores for the CPU reference runs
jobs=()
if [ "$TEST_JOBS" -gt 1 ] && "$PY" -c 'import xdist' 2>/dev/null; then
  jobs=(-n "$TEST_JOBS")
fi
OMP_NUM_THREADS=$(( $(nproc) / TEST_JOBS > 0 ? $(nproc) / TEST_JOBS : 1 )) \
timeout "$TESTS_S" "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider --timeout "$TEST_S" \
  "${jobs[@]}" --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1 || status=1
"$PY" scripts/junit_summary.py "$OUT/gpu_tests.xml" |
  while IFS=$'\t' read -r name st detail; do summary "$name" "$st" "$detail"; done
fi
if [[ ",$PARTS," == *",loss,"* ]]; then
  if timeout "${LOSS_S:-120}" "$PY" bench/kd_loss.py --json "$OUT/kd_loss.json" \
       > "$OUT/kd_loss.log" 2>&1; then
    summary kd-loss pass "$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["tiles_impl"], {k: v["ms"] for k, v in d["runs"].items()})' "$OUT/kd_loss.json")"
  else
    status=1
    summary kd-loss fail "see $OUT/kd_loss.log"
  fi
fi
if [[ ",$PARTS," != *",bench,"* ]]; then
  echo '{"skipped": "PARTS has no bench"}' > "$OUT/gpu_bench.json"
  exit $status
fi
QUICK_RUNS=te-bf16,te-fp8   # the local spec where Transformer Engine is missing (after TE_KIT)
"$PY" -c 'import sys; from recipes.lib.runtime import have_te; sys.exit(0 if have_te() else 1)' \
  2>/dev/null || QUICK_RUNS=local-bf16
BENCH_ARGS=${BENCH_ARGS:---runs $QUICK_RUNS --seqs 4096}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
if timeout "$BENCH_S" "$PY" bench/gpu_distill.py --json "$OUT/gpu_bench.json" $BENCH_ARGS \
     --timeout $((BENCH_S / 2 - 5)) > "$OUT/gpu_bench.log" 2>&1; then
  summary bench pass "$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print({s: {k: round(v.get("tokens_per_s", 0)) for k, v in r.items()} for s, r in d["results"].items()})' "$OUT/gpu_bench.json")"
else
  status=1
  [ -s "$OUT/gpu_bench.json" ] || echo "{\"error\": \"benchmark failed or timed out after $BENCH_S s; see gpu_bench.log\"}" > "$OUT/gpu_bench.json"
  summary bench fail "see $OUT/gpu_bench.log"
fi
cat "$OUT/gpu_bench.json"
exit $status
