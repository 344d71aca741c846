"""Distillation step throughput at the paper's shapes on one GPU: Llama-3.1-8B teacher and its
4.5B width-pruned student, random weights, our recipe's model / ModelOpt KD / megatron optimizer.

    python bench/gpu_distill.py --json out.json                 # one GPU: bf16 (+ fp8 with TE)
    python bench/gpu_distill.py --tiny --json out.json          # CPU smoke test of the same path

Reports tokens/s, MFU ((6 * student + 2 * teacher params) * tokens/s over the GPU's dense peak),
peak memory, and fp8 / bf16 when Transformer Engine is present (else fp8 is skipped, with why).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}  # H100/H200 SXM dense


def measure(teacher_arch, student_arch, precision: str, seq: int, steps: int) -> dict:
    from recipes import distill
    from recipes.lib import model as M
    from recipes.lib import runtime, train

    with runtime.distributed(1, 1):
        dtype = "fp32" if precision == "fp32" else "bf16"
        extra = {"fp8": "hybrid", "fp8_recipe": "delayed"} if precision == "fp8" else {}
        spec = "te" if precision == "fp8" else "auto"
        teacher = M.build(teacher_arch, dtype=dtype, spec=spec, init=True, **extra)
        student = M.build(student_arch, dtype=dtype, spec=spec, init=True, **extra)
        c = distill.DistillConfig(input="-", teacher="-", data=["-"], seq_length=seq,
                                  micro_batch_size=1, global_batch_size=1, train_iters=steps + 1,
                                  warmup_iters=0, precision=precision)
        model = distill.distillation_model(student, teacher, c, student_arch.vocab_size)
        ddp, opt, _ = train.build_optimizer(model, c)
        dev = next(model.parameters()).device
        toks = torch.randint(0, student_arch.vocab_size, (1, seq + 1), device=dev)
        batch = {"tokens": toks[:, :-1], "labels": toks[:, 1:],
                 "loss_mask": torch.ones(1, seq, device=dev),
                 "position_ids": torch.arange(seq, device=dev).unsqueeze(0)}
        from megatron.core.pipeline_parallel import get_forward_backward_func

        step_fn = distill.make_step_fn(model, student_arch.vocab_size, True, False)
        times, losses = [], []
        for i in range(steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.time()
            ddp.zero_grad_buffer()
            opt.zero_grad()
            rep = get_forward_backward_func()(
                forward_step_func=step_fn(True), data_iterator=iter([batch]), model=[ddp],
                num_microbatches=1, seq_length=seq, micro_batch_size=1, forward_only=False)
            opt.step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.time() - t0)
            losses.append((rep[0]["kd_loss"][0] / rep[0]["kd_loss"][1]).item())
        warm = times[1:] if len(times) > 1 else times
        tps = seq / (sum(warm) / len(warm))
        flops = (6 * student_arch.num_params() + 2 * teacher_arch.num_params()) * tps
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() \
            else runtime.peak_rss_mb() / 1024
        return {"precision": precision, "seq_length": seq, "step_s": warm,
                "tokens_per_s": tps, "tflops": flops / 1e12,
                "mfu": flops / 1e12 / PEAK_TFLOPS.get(precision, float("nan")),
                "peak_memory_gb": mem, "kd_loss": losses}


def main() -> None:
    from recipes.lib.arch import Arch
    from recipes.lib.model import have_te
    from recipes.plan import teacher_arch

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, CPU fp32 (smoke test)")
    a = ap.parse_args()
    t = teacher_arch(str(ROOT / "conf/arch/llama-3.1-8b.json"))
    if a.tiny:
        t = Arch(**{**t.to_dict(), "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
                    "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 16,
                    "vocab_size": 512})
    s = Arch(**{**t.to_dict(), "hidden_size": t.hidden_size * 3 // 4,
                "ffn_hidden_size": t.ffn_hidden_size * 9 // 14})
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "teacher_params": t.num_params(), "student_params": s.num_params(), "runs": {}}
    first = "fp32" if a.tiny else "bf16"
    out["runs"][first] = measure(t, s, first, a.seq, a.steps)
    if a.tiny:
        out["runs"]["fp8"] = {"skipped": "tiny CPU smoke test"}
    elif have_te():
        out["runs"]["fp8"] = measure(t, s, "fp8", a.seq, a.steps)
        out["fp8_over_bf16"] = (out["runs"]["fp8"]["tokens_per_s"]
                                / out["runs"]["bf16"]["tokens_per_s"])
    else:
        out["runs"]["fp8"] = {"skipped": "Transformer Engine is not installed here (its wheels "
                                         "exceed what this machine can receive); run "
                                         "scripts/gpu_check.sh in the NVIDIA container"}
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
