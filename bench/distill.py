"""Student tokens/s and peak memory of our distillation loop against the plain PyTorch +
transformers KD loop a user would write instead, on the same models, data, batch, sequence
length, precision and steps.

    .venv/bin/python bench/distill.py            # tiny random models (fast; CI-sized)
    .venv/bin/python bench/distill.py --demo     # the demo's real shapes: SmolLM2-135M teacher,
                                                 # its 71M width-pruned student, 8 x 256, bf16

Each side runs in its own child process (peak RSS = VmHWM of that process):
(a) ours: `recipes.distill` (megatron-core + ModelOpt, TP=PP=1);
(b) the reference: teacher and exported student in transformers; the teacher under
    `torch.no_grad` (in bf16 for --demo), the student with fp32 parameters (under
    `torch.autocast("cpu", bfloat16)` for --demo), forward KL on the logits, grad clipping 1.0,
    torch.optim.AdamW.
Throughput is the median step time over the steps after the first two (validation and checkpoint
saves are outside the step on both sides: the reference does neither). Each side then runs one
more step under bench/op_clock.py's clock: its GEMMs, its attention and the rest. Prints JSON
with both, the ratios ours / reference, and the ceiling: the reference's step over our GEMMs +
attention, the most any rework of the rest of our step could reach, since both run those
kernels on the same FLOPs. --demo builds (and caches) its inputs in --run-dir with the demo's
own stages: data, convert, prune (of the uncorrected teacher: same shapes), export.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import op_clock  # noqa: E402 (after the path)

REFERENCE = """
import contextlib, json, sys, time, torch
from transformers import AutoModelForCausalLM
from bench.op_clock import OpClock
from recipes.lib import tokens
from recipes.lib.runtime import peak_rss_mb
teacher_dir, student_dir, data_dir, steps, seq, batch, precision = sys.argv[1:8]
steps, seq, batch = int(steps), int(seq), int(batch)
torch.manual_seed(0)
low = precision == "bf16"
teacher = AutoModelForCausalLM.from_pretrained(
    teacher_dir, dtype=torch.bfloat16 if low else torch.float32).eval()
student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).train()
for p in teacher.parameters():
    p.requires_grad_(False)
opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
w = tokens.windows(data_dir, "train", seq, steps * batch, seed=0)
autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if low else contextlib.nullcontext

def step(x):
    with autocast():
        with torch.no_grad():
            lt = teacher(x, use_cache=False).logits.float().log_softmax(-1)
        ls = student(x, use_cache=False).logits.float().log_softmax(-1)
        loss = torch.nn.functional.kl_div(ls, lt, log_target=True, reduction="none").sum(-1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad()


times, clock = [], OpClock()
for s in range(steps):
    t0 = time.time()
    step(w[s * batch:(s + 1) * batch, :-1])
    times.append(time.time() - t0)
with clock:  # one more step, under the clock
    step(w[:batch, :-1])
print(json.dumps({"step_s": times, "clock": clock.seconds, "peak_rss_mb": peak_rss_mb()}))
"""


def stage(name: str, common: list[str], *extra: str, entry: list[str] | None = None) -> None:
    """recipes.<name> in a child process, or `entry` (a script and its first arguments) given
    the stage's arguments."""
    subprocess.run([sys.executable, *(entry or ["-m", f"recipes.{name}"]), *common, *extra],
                   cwd=ROOT, check=True, capture_output=True)


def prepare_tiny(tmp: Path) -> tuple[Path, Path, list[str]]:
    """Random GQA teacher (hidden 256, 4 layers) pruned to hidden 128 / FFN 256 / 4 heads."""
    from tests.corpus import write_corpus
    from tests.tiny_models import write_tiny_llama

    hf = write_tiny_llama(tmp / "teacher", "gqa", hidden_size=256, intermediate_size=512,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    corpus = write_corpus(tmp / "corpus", n_docs=400)
    common = ["--config", str(ROOT / "conf/tiny.yaml"), f"run.dir={tmp / 'run'}",
              f"convert.hf_path={hf}", "run.log_level=WARNING"]
    stage("data", common, f"data.input={corpus}")
    stage("convert", common)
    stage("prune", common, "prune.hidden_size=128", "prune.ffn_hidden_size=256",
          "prune.num_attention_heads=4")
    return hf, tmp / "run", common


def prepare_demo(run: Path) -> tuple[Path, Path, list[str]]:
    """conf/demo.yaml's data, teacher and pruned student (cached in `run`); the uncorrected
    teacher, which has the corrected one's shapes."""
    hf = ROOT / "data/demo/smollm2-135m-instruct"
    if not hf.is_dir():
        sys.exit(f"{hf} is missing: run `make assets` first")
    common = ["--config", str(ROOT / "conf/demo.yaml"), f"run.dir={run}",
              "run.log_level=WARNING", f"prune.input={run / 'convert'}",
              f"distill.teacher={run / 'convert'}"]
    stage("data", common)
    stage("convert", common)
    stage("prune", common)
    return hf, run, common


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", action="store_true", help="the demo's real models and shapes")
    ap.add_argument("--run-dir", default=str(ROOT / "runs/bench_demo"),
                    help="--demo: where its inputs are built and cached")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="our micro-batch (default --batch: one micro-batch, as the reference)")
    ap.add_argument("--precision", default=None, help="fp32 | bf16 (default: --demo bf16)")
    a = ap.parse_args()
    precision = a.precision or ("bf16" if a.demo else "fp32")
    micro = a.micro_batch or a.batch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf, run, common = prepare_demo(Path(a.run_dir)) if a.demo else prepare_tiny(tmp)
        stage("export", common, f"export.input={run / 'prune'}",
              f"export.output={tmp / 'student'}")
        n = a.steps + 1  # the timed steps, then one under bench/op_clock.py's clock
        stage("distill", common, f"distill.output={tmp / 'distill'}",
              f"distill.train_iters={n}", f"distill.seq_length={a.seq}",
              f"distill.global_batch_size={a.batch}", f"distill.micro_batch_size={micro}",
              f"distill.precision={precision}", f"distill.eval_interval={n}",
              "distill.warmup_iters=0",  # the demo's 8 would refuse --steps 8
              "distill.eval_iters=1", f"distill.save_interval={n}",
              "distill.log_interval=1", "distill.keep_checkpoints=false",
              entry=["bench/op_clock.py", str(tmp / "clock.json")])
        rows = [json.loads(x) for x in (tmp / "distill/logs/metrics.jsonl").read_text()
                .splitlines()]
        ours = {"step_s": [r["step_s"] for r in rows if "step_s" in r][:-1],
                "clock": json.loads((tmp / "clock.json").read_text()),
                "peak_rss_mb": max(r["memory_mb"] for r in rows if "memory_mb" in r)}
        ref = json.loads(subprocess.run(
            [sys.executable, "-c", REFERENCE, str(hf), str(tmp / "student"),
             str(run / "data"), str(a.steps), str(a.seq), str(a.batch), precision],
            cwd=ROOT, check=True, capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.splitlines()[-1])
    print(json.dumps(report(a, precision, ours, ref), indent=2))


def report(a, precision: str, ours: dict, ref: dict) -> dict:
    """Both sides' tokens/s (median of the steps after the first two), peak RSS, where a step's
    time goes (bench/op_clock.py) and the ratios ours / reference, with the ceiling: the ratio
    if all of our step but its GEMMs and attention took no time."""
    tok = a.seq * a.batch
    step = {k: statistics.median(side["step_s"][2:]) for k, side in (("ours", ours),
                                                                       ("ref", ref))}
    ours_split = op_clock.split(step["ours"], ours["clock"])
    shared_s = ours_split["gemm_s"] + ours_split["attention_s"]
    return {
        "shapes": "demo" if a.demo else "tiny", "precision": precision, "steps": a.steps,
        "tokens_per_step": tok,
        "ours": {"tokens_per_s": round(tok / step["ours"]), "peak_rss_mb": round(
            ours["peak_rss_mb"]), "step_s": round(step["ours"], 3), **ours_split},
        "transformers_kd": {"tokens_per_s": round(tok / step["ref"]), "peak_rss_mb": round(
            ref["peak_rss_mb"]), "step_s": round(step["ref"], 3),
            **op_clock.split(step["ref"], ref["clock"])},
        "ratio_tokens_per_s": round(step["ref"] / step["ours"], 2),
        "ratio_peak_rss": round(ours["peak_rss_mb"] / ref["peak_rss_mb"], 2),
        "ceiling_ratio_tokens_per_s": round(step["ref"] / shared_s, 2)}


if __name__ == "__main__":
    main()
