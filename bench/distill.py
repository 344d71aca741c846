"""Student tokens/s and peak memory of our distillation loop against a plain PyTorch +
transformers KD loop on the same models, batch and sequence length.

    .venv/bin/python bench/distill.py [--steps 12 --seq 256 --batch 8]

Builds a random teacher (hidden 256, 4 layers, GQA) and prunes it to a student with our stages,
then runs, each in its own child process (peak RSS = VmHWM of that process): (a) `recipes.distill`
(megatron-core + ModelOpt, fp32, TP=PP=1), and (b) the reference: the exported student and the
teacher in transformers, forward KL on logits, torch AdamW. Throughput is the median over steps
after the first two. Prints both and the ratio ours / reference.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCE = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
from recipes.lib import tokens
from recipes.lib.runtime import peak_rss_mb
teacher_dir, student_dir, data_dir, steps, seq, batch = sys.argv[1:7]
steps, seq, batch = int(steps), int(seq), int(batch)
torch.manual_seed(0)
teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).train()
for p in teacher.parameters():
    p.requires_grad_(False)
opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
w = tokens.windows(data_dir, "train", seq, steps * batch, seed=0)
times = []
for s in range(steps):
    x = w[s * batch:(s + 1) * batch, :-1]
    t0 = time.time()
    with torch.no_grad():
        lt = teacher(x, use_cache=False).logits.log_softmax(-1)
    ls = student(x, use_cache=False).logits.log_softmax(-1)
    loss = torch.nn.functional.kl_div(ls, lt, log_target=True, reduction="none").sum(-1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    times.append(time.time() - t0)
print(json.dumps({"step_s": times, "peak_rss_mb": peak_rss_mb()}))
"""


def main() -> None:
    from tests.corpus import write_corpus
    from tests.tiny_models import write_tiny_llama

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    py = [sys.executable, "-m"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = write_tiny_llama(tmp / "teacher", "gqa", hidden_size=256, intermediate_size=512,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=32)
        corpus = write_corpus(tmp / "corpus", n_docs=400)
        common = ["--config", str(ROOT / "conf/tiny.yaml"), f"run.dir={tmp / 'run'}",
                  f"convert.hf_path={hf}", "run.log_level=WARNING"]
        for stage, extra in (("data", [f"data.input={corpus}"]), ("convert", []),
                             ("prune", ["prune.hidden_size=128", "prune.ffn_hidden_size=256",
                                        "prune.num_attention_heads=4"]),
                             ("export", [f"export.input={tmp / 'run/prune'}"])):
            subprocess.run(py + [f"recipes.{stage}", *common, *extra], cwd=ROOT, check=True,
                           capture_output=True)
        subprocess.run(py + ["recipes.distill", *common, f"distill.train_iters={a.steps}",
                             f"distill.seq_length={a.seq}",
                             f"distill.global_batch_size={a.batch}",
                             f"distill.micro_batch_size={a.batch}",
                             f"distill.eval_interval={a.steps}",
                             f"distill.save_interval={a.steps}"],
                       cwd=ROOT, check=True, capture_output=True)
        rows = [json.loads(x) for x in (tmp / "run/distill/logs/metrics.jsonl").read_text()
                .splitlines()]
        ours_s = [r["step_s"] for r in rows if "step_s" in r]
        ours_mb = max(r["memory_mb"] for r in rows if "memory_mb" in r)
        ref = json.loads(subprocess.run(
            [sys.executable, "-c", REFERENCE, str(hf), str(tmp / "run/export"),
             str(tmp / "run/data"), str(a.steps), str(a.seq), str(a.batch)], cwd=ROOT,
            check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    tok = a.seq * a.batch
    ours_tps = tok / statistics.median(ours_s[2:])
    ref_tps = tok / statistics.median(ref["step_s"][2:])
    print(json.dumps({"tokens_per_step": tok, "ours": {"tokens_per_s": round(ours_tps),
                                                       "peak_rss_mb": round(ours_mb)},
                      "transformers_kd": {"tokens_per_s": round(ref_tps),
                                          "peak_rss_mb": round(ref["peak_rss_mb"])},
                      "ratio_tokens_per_s": round(ours_tps / ref_tps, 2),
                      "ratio_peak_rss": round(ours_mb / ref["peak_rss_mb"], 2)}, indent=2))


if __name__ == "__main__":
    main()
