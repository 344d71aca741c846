"""Distillation step throughput at the paper's shapes on one GPU: Llama-3.1-8B teacher and its
4.5B width-pruned student, random weights, our recipe's model / ModelOpt KD / megatron optimizer.

    python bench/gpu_distill.py --json out.json                 # one GPU: bf16 (+ fp8 with TE)
    python bench/gpu_distill.py --tiny --json out.json          # CPU smoke test of the same path

Each precision runs in its own process (`--only P`), so one run's memory and peak never leak into
the next. Models are built with the recipe's own `train_stage.build_kwargs` (fp8: the student in
the configured fp8 recipe, the teacher in bf16 as `distill` does). Reports tokens/s, MFU
((6 * student + 2 * teacher params) * tokens/s over the detected GPU's dense peak; omitted for a
GPU not in PEAK_TFLOPS, never another chip's number), peak memory and fp8 / bf16.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# dense (no sparsity) peak TFLOP/s per datasheet; the first name contained in the device name wins
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp8": 1513.0}),
    ("H100 NVL", {"bf16": 835.0, "fp8": 1671.0}),
    ("H100", {"bf16": 989.0, "fp8": 1979.0}),   # SXM
    ("H200", {"bf16": 989.0, "fp8": 1979.0}),
    ("H20", {"bf16": 148.0, "fp8": 296.0}),
    ("GH200", {"bf16": 989.0, "fp8": 1979.0}),
    ("B200", {"bf16": 2250.0, "fp8": 4500.0}),
    ("A100", {"bf16": 312.0}),                  # no fp8 on Ampere
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    # longest matching name first: "GH200" before "H200", "H100 PCIe" before "H100"
    for name, peaks in sorted(PEAK_TFLOPS, key=lambda x: -len(x[0])):
        if name in device_name:
            return peaks.get(precision)
    return None


def measure(teacher_arch, student_arch, precision: str, seq: int, steps: int) -> dict:
    from recipes import distill
    from recipes.lib import model as M
    from recipes.lib import kd, runtime, train, train_stage

    with runtime.distributed(1, 1):
        c = distill.DistillConfig(input="-", teacher="-", data=["-"], seq_length=seq,
                                  micro_batch_size=1, global_batch_size=1, train_iters=steps + 1,
                                  warmup_iters=0, precision=precision)
        train_stage.check_precision(c)
        teacher = M.build(teacher_arch, **{**train_stage.build_kwargs(c, c.teacher_precision),
                                           "init": True})
        student = M.build(student_arch, **{**train_stage.build_kwargs(c), "init": True})
        model, kl = kd.distillation_model(student, teacher, c, student_arch.vocab_size)
        ddp, opt, _ = train.build_optimizer(model, c)
        dev = next(model.parameters()).device
        toks = torch.randint(0, student_arch.vocab_size, (1, seq + 1), device=dev)
        batch = {"tokens": toks[:, :-1], "labels": toks[:, 1:],
                 "loss_mask": torch.ones(1, seq, device=dev),
                 "position_ids": torch.arange(seq, device=dev).unsqueeze(0)}
        from megatron.core.pipeline_parallel import get_forward_backward_func

        step_fn = kd.make_step_fn(model, kl, student_arch.vocab_size, True, False)
        times, losses = [], []
        for _ in range(steps):
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
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        peak = peak_tflops(device, precision)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() \
            else runtime.peak_rss_mb() / 1024
        return {"precision": precision, "device": device, "seq_length": seq, "step_s": warm,
                "tokens_per_s": tps, "tflops": flops / 1e12,
                "peak_tflops": peak, "mfu": None if peak is None else flops / 1e12 / peak,
                "peak_memory_gb": mem, "kd_loss": losses,
                "build": {"student": train_stage.build_kwargs(c),
                          "teacher": train_stage.build_kwargs(c, c.teacher_precision)}}


def archs(tiny: bool):
    from recipes.lib.arch import Arch

    f = ROOT / "conf" / "arch" / "llama-3.1-8b.json"
    t = Arch.from_hf_config(json.loads(f.read_text()), str(f))
    if tiny:
        t = Arch(**{**t.to_dict(), "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
                    "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 16,
                    "vocab_size": 512})
    s = Arch(**{**t.to_dict(), "hidden_size": t.hidden_size * 3 // 4,
                "ffn_hidden_size": t.ffn_hidden_size * 9 // 14})
    return t, s


def run_one(a) -> None:
    """Child process: measure one precision, write its JSON."""
    t, s = archs(a.tiny)
    Path(a.json).write_text(json.dumps(measure(t, s, a.only, a.seq, a.steps), indent=2) + "\n")


def main() -> None:
    from recipes.lib.runtime import have_te

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, CPU fp32 (smoke test)")
    ap.add_argument("--only", help="measure this precision in this process (internal)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per precision")
    a = ap.parse_args()
    if a.only:
        return run_one(a)
    t, s = archs(a.tiny)
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "teacher_params": t.num_params(), "student_params": s.num_params(), "runs": {}}
    todo = ["fp32"] if a.tiny else ["bf16"] + (["fp8"] if have_te() else [])
    for precision in todo:
        part = Path(a.json).with_suffix(f".{precision}.json")
        cmd = [sys.executable, __file__, "--json", str(part), "--only", precision,
               "--seq", str(a.seq), "--steps", str(a.steps)] + (["--tiny"] if a.tiny else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            out["runs"][precision] = json.loads(part.read_text()) if p.returncode == 0 else {
                "error": f"exit {p.returncode}", "stderr_tail": p.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            out["runs"][precision] = {"error": f"timed out after {a.timeout} s"}
    if a.tiny:
        out["runs"]["fp8"] = {"skipped": "tiny CPU smoke test"}
    elif not have_te():
        out["runs"]["fp8"] = {"skipped": "Transformer Engine is not installed here (its wheels "
                                         "exceed what this machine can receive); run "
                                         "scripts/gpu_check.sh in the NVIDIA container"}
    elif "tokens_per_s" in out["runs"].get("fp8", {}) and "tokens_per_s" in out["runs"]["bf16"]:
        out["fp8_over_bf16"] = (out["runs"]["fp8"]["tokens_per_s"]
                                / out["runs"]["bf16"]["tokens_per_s"])
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    if any("error" in r for r in out["runs"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
