"""`plan`: what a recipe will build and cost, before any weights are loaded.

    python -m recipes.plan --config conf/llama31_8b_to_4b_width.yaml

Prints the teacher and student architectures and parameter counts, the memory each stage needs
per GPU at the configured parallelism, the distillation token budget and a GPU-hour estimate.
Everything is arithmetic on the architecture (the teacher's config.json only). Targets that
cannot be built fail here with the same errors `prune` would raise.

Estimates, stated as such: weights bf16; fused (flash) attention, so stored activations are
34*s*h bytes per layer at micro-batch 1 (Korthikanti et al. 2022 without the s^2 term), divided
by TP; pruning is forward-only (one layer's activations live at a time, plus fp32 logits);
distillation uses megatron's distributed optimizer (bf16 params + fp32 grads per model-parallel
shard; fp32 master weights and Adam moments sharded over data-parallel ranks), a frozen bf16
teacher with the same TP/PP, and fp32 student + teacher logits; with
distill.precision_aware_optimizer, 2 bytes less per student parameter (16-bit remainders
instead of fp32 master weights); with distill.precision=fp8 (or teacher_precision=fp8), TE's
cached fp8 weight copies, less the bf16 matmul inputs it stores as fp8; with
distill.recompute_layers, those layers' inputs alone (arch.prune_memory, arch.training_memory,
arch.fp8_memory, arch.stored_activations; within 1.1% of the H200's peaks, docs/gpu.md). GPU
hours = model FLOPs (arch.distill_flops_per_token: matmuls and causal attention, 3x the
student's forward + the teacher's) / (peak FLOP/s * MFU).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

from recipes.lib import config, search, stage
from recipes.lib.arch import (WIDTH_KEYS, Arch, distill_flops_per_token, prune_memory,
                               pruned_arch, training_memory, validate_layout)
from recipes.lib.train_config import TrainConfig

GB = 1024**3


@dataclasses.dataclass(kw_only=True)
class PlanConfig:
    teacher_config: str
    """The teacher's config.json, or its HF folder (no weights needed)."""
    distill_tokens: float = 94e9
    """Distillation token budget (the paper: 94B)."""
    seq_length: int = 8192
    """Distillation sequence length (the paper: 8192)."""
    global_batch_size: int = 1152
    """Distillation sequences per step (the paper: 1152)."""
    gpus: int = 256
    """GPUs for distillation (the paper: 256 H100)."""
    gpu_memory_gb: float = 80.0
    """Memory per GPU, for the fits / does-not-fit column."""
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989)."""
    mfu: float = 0.40
    """Assumed model FLOP utilisation (one H200 measured 54% for TE bf16 distillation at seq
    8192, DP=1, docs/gpu.md; a cluster's communication takes some of it)."""
    inference_batch: int = 32
    """Batch of the larger decode estimate (KV cache bytes grow with it)."""

    def __post_init__(self):
        if not 0 < self.mfu <= 1:
            raise ValueError(f"plan.mfu={self.mfu} must be in (0, 1]")


def teacher_arch(path: str) -> Arch:
    p = Path(path)
    if p.is_dir():
        return Arch.from_hf_dir(p)
    if not p.is_file():
        raise FileNotFoundError(f"plan.teacher_config={path}: no such file or folder")
    return Arch.from_hf_config(json.loads(p.read_text()), str(p))


def layouts(t: Arch, s: Arch, p: PlanConfig, settings: dict) -> list[dict]:
    """TP x PP layouts valid for both models, with their distillation memory per GPU
    (`settings`: memory_settings)."""
    out = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8):
            if t.num_query_groups % tp or s.num_layers % pp or t.num_layers % pp \
                    or p.gpus % (tp * pp):
                continue
            gb = training_memory(t, s, p.seq_length, tp, pp, p.gpus // (tp * pp),
                                 **settings) / GB
            out.append({"tp": tp, "pp": pp, "dp": p.gpus // (tp * pp), "distill_gb": gb,
                        "fits": gb <= p.gpu_memory_gb})
    return out


def inference_ratios(t: Arch, s: Arch, seq: int, batch: int) -> dict:
    """Expected teacher-time / student-time, bf16: decode is memory-bound (weights + KV cache
    read per generated token, context `seq`), prefill compute-bound (FLOPs per token: matmuls,
    lm_head, causal attention over `seq`). Compare `evaluate.speed`'s measurement."""
    def decode_bytes(a: Arch, b: int) -> float:
        kv = b * 2 * a.num_layers * a.num_query_groups * a.head_dim * seq * 2
        return 2 * a.num_params() + kv

    def prefill_flops(a: Arch) -> float:
        emb = a.vocab_size * a.hidden_size * (1 if a.tie_embeddings else 2)
        return 2 * (a.num_params() - emb) + 2 * a.vocab_size * a.hidden_size \
            + 2 * a.num_layers * seq * a.num_attention_heads * a.head_dim

    return {"decode_batch_1": decode_bytes(t, 1) / decode_bytes(s, 1),
            f"decode_batch_{batch}": decode_bytes(t, batch) / decode_bytes(s, batch),
            "prefill": prefill_flops(t) / prefill_flops(s), "seq_length": seq}


def distill_section(cfg: config.Config) -> dict:
    """The recipe's distill settings as written (plan types only its own and prune's)."""
    d = cfg.get("distill")
    return d if isinstance(d, dict) else {}


def memory_settings(cfg: config.Config) -> dict:
    """The distill settings that change its memory (training_memory's keywords): the
    precision-aware optimizer, fp8 for the student, or the teacher too (never by default), and
    activation recompute."""
    d = distill_section(cfg)
    return {"precision_aware": bool(d.get("precision_aware_optimizer")),
            "precision": d.get("precision", "auto"),
            "teacher_precision": d.get("teacher_precision") or "bf16",
            "bf16_edge_layers": int(d.get("fp8_bf16_edge_layers") or 0),
            "recompute_layers": int(d.get("recompute_layers") or 0)}


def estimate(cfg: config.Config) -> dict:
    """All the numbers `plan` prints, as a dict. `cfg` has a typed `plan` and, if the recipe
    prunes, a typed `prune` section."""
    p: PlanConfig = cfg.plan
    teacher = teacher_arch(p.teacher_config)
    prune_cfg = cfg.get("prune")
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    searched = search_preview(teacher, prune_cfg, cfg, p) if prune_cfg and \
        prune_cfg.searching else None
    if searched:  # the budget below is the largest shape the search would consider
        student, drop = searched["shapes"][0], None
    else:
        student, drop = pruned_arch(teacher, prune_cfg) if prune_cfg else (teacher, None)
    validate_layout(teacher, tp, pp)
    validate_layout(student, tp, pp)
    nt, ns = teacher.num_params(), student.num_params()
    dp = max(p.gpus // (tp * pp), 1)
    settings = memory_settings(cfg)
    steps = p.distill_tokens / (p.seq_length * p.global_batch_size)
    flops = distill_flops_per_token(teacher, student, p.seq_length) * p.distill_tokens
    gpu_s = flops / (p.peak_tflops * 1e12 * p.mfu)
    prune_seq = prune_cfg.seq_length if prune_cfg else 4096
    mem = {
        "convert (host RAM per process)": 2 * teacher.padded_vocab_size * teacher.hidden_size * 2,
        f"prune (per GPU, TP=1 PP={pp})": prune_memory(teacher, prune_seq, pp),
        f"distill (per GPU, TP={tp} PP={pp})": training_memory(teacher, student, p.seq_length,
                                                               tp, pp, dp, **settings),
        "export (host RAM, rank 0)": 2 * ns,
    }
    return {
        "teacher": {**teacher.to_dict(), "params": nt},
        "student": {**student.to_dict(), "params": ns},
        "drop_layers_1indexed": drop, "parallel": {"tp": tp, "pp": pp, "dp": dp},
        "memory_gb": {k: v / GB for k, v in mem.items()},
        "prune_pp_that_fit": [q for q in (1, 2, 4, 8) if teacher.num_layers % q == 0
                              and prune_memory(teacher, prune_seq, q) / GB <= p.gpu_memory_gb],
        "distill_layouts": layouts(teacher, student, p, settings), "distill_memory": settings,
        "inference_speedup": inference_ratios(teacher, student, p.seq_length, p.inference_batch),
        "distill": {"tokens": p.distill_tokens, "steps": steps, "flops": flops,
                    "gpu_hours": gpu_s / 3600, "wall_hours": gpu_s / 3600 / p.gpus},
        "search": searched and {**searched, "shapes": [
            {**{k: a.to_dict()[k] for k in (*WIDTH_KEYS, "num_layers")}, "params": a.num_params()}
            for a in searched["shapes"]]},
    }


def search_preview(teacher: Arch, c: search.Budget, cfg: config.Config, p: PlanConfig) -> dict:
    """What prune's search would consider (recipes/lib/search.py) and its tournament's cost."""
    s = c.search
    target = search.constraint(c, teacher)
    space, shapes = search.check_target(c, teacher, cfg.parallel.pp)
    top = shapes[:s.top_k]
    d = distill_section(cfg)
    gbs, seq = int(d.get("global_batch_size", p.global_batch_size)), int(d.get(
        "seq_length", p.seq_length))
    steps = search.tournament_steps(s, gbs, seq)
    out = {"constraint": target, "space": space, "fitting": len(shapes), "shapes": top,
           "top_k": s.top_k, "tournament_steps": steps}
    if steps:
        tokens = steps * gbs * seq
        flops = sum(distill_flops_per_token(teacher, a, seq) for a in top) * tokens
        dc = types.SimpleNamespace(train_iters=steps, global_batch_size=gbs, seq_length=seq,
                                   micro_batch_size=int(d.get("micro_batch_size", 1)),
                                   eval_iters=int(d.get("eval_iters", TrainConfig.eval_iters)),
                                   intermediate_layer_pairs=d.get("intermediate_layer_pairs"),
                                   teacher_precision=d.get("teacher_precision")
                                   or d.get("precision", "bf16"))
        out["tournament"] = {"tokens_per_candidate": tokens, "flops": flops,
                             "gpu_hours": flops / (p.peak_tflops * 1e12 * p.mfu) / 3600,
                             "teacher_cache": search.cache_plan(s, dc, teacher)}
    return out


def render(e: dict, p: PlanConfig) -> str:
    t, s = e["teacher"], e["student"]
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
            "num_query_groups", "head_dim", "vocab_size")
    lines = []
    if e.get("search"):
        sr = e["search"]
        lines += [f"prune searches {sr['constraint']}: ModelOpt's space "
                  + ", ".join(f"{k} {v}" for k, v in sr["space"].items())
                  + (f"; {sr['fitting']} shapes fit (our count), the top {sr['top_k']} by size:"
                     if "params" in sr["constraint"] else
                     f"; {sr['fitting']} loadable shapes, the largest {sr['top_k']} (the memory "
                     "budget is ModelOpt's estimate, applied when prune runs):")]
        lines += [f"  {x}" for x in sr["shapes"]]
        if sr.get("tournament"):
            tour = sr["tournament"]
            lines.append(f"tournament: {len(sr['shapes'])} candidates x {sr['tournament_steps']} "
                         f"steps ({tour['tokens_per_candidate']:,} tokens each), "
                         f"{tour['flops']:.3g} FLOPs, ~{tour['gpu_hours']:,.1f} GPU-hours at "
                         f"{p.mfu:.0%} MFU")
            tc = tour["teacher_cache"]
            lines.append("  teacher: " + (
                "online for each candidate" if tc is None else
                f"online for each candidate ({tc['why']})" if tc["encoding"] == "online" else
                f"logits cached once, {tc['mb']:,.0f} MB on disk ("
                + ("full vocabulary)" if tc["top_k"] is None else
                   f"top {tc['top_k']}; the full vocabulary would take {tc['full_mb']:,.0f} MB)")))
        lines.append("the student below is the largest candidate (the winner is known only "
                     "after the search)\n")
    lines += ["| | teacher | student |", "|---|---|---|"]
    lines += [f"| {k} | {t[k]} | {s[k]} |" for k in keys]
    lines.append(f"| parameters | {t['params'] / 1e9:.2f}B | {s['params'] / 1e9:.2f}B "
                 f"({s['params'] / t['params']:.1%}) |")
    if e["drop_layers_1indexed"]:
        lines.append(f"\ndropped layers (1-indexed): {e['drop_layers_1indexed']}")
    par = e["parallel"]
    lines.append(f"\nmemory at TP={par['tp']} PP={par['pp']} DP={par['dp']} "
                 f"(estimates; GPU has {p.gpu_memory_gb:.0f} GB):")
    for k, v in e["memory_gb"].items():
        fits = "" if "host" in k else ("  fits" if v <= p.gpu_memory_gb else "  DOES NOT FIT")
        lines.append(f"  {k:34s} {v:8.1f} GB{fits}")
    m = e["distill_memory"]
    lines.append(f"  (distill counted with precision={m['precision']}, teacher_precision="
                 f"{m['teacher_precision']}, fp8_bf16_edge_layers={m['bf16_edge_layers']}, "
                 f"recompute_layers={m['recompute_layers']}, precision_aware_optimizer="
                 f"{str(m['precision_aware']).lower()}: the recipe's distill section)")
    lines.append(f"  prune fits at PP in {e['prune_pp_that_fit']}")
    fit = [f"TP{x['tp']}xPP{x['pp']} ({x['distill_gb']:.0f} GB)" for x in e["distill_layouts"]
           if x["fits"]]
    lines.append(f"  distill layouts that fit on {p.gpus} GPUs: {', '.join(fit) or 'none'}")
    d = e["distill"]
    lines.append(f"\ndistillation: {d['tokens'] / 1e9:.1f}B tokens = {d['steps']:,.0f} steps of "
                 f"{p.global_batch_size} x {p.seq_length}; {d['flops']:.3g} FLOPs; "
                 f"~{d['gpu_hours']:,.0f} GPU-hours at {p.mfu:.0%} MFU of "
                 f"{p.peak_tflops:.0f} TFLOP/s = ~{d['wall_hours']:.1f} h on {p.gpus} GPUs")
    inf = e["inference_speedup"]
    lines.append(f"\nexpected inference speed-up of the student (bf16, context {inf['seq_length']}"
                 "): decode " + ", ".join(f"{v:.2f}x at batch {k.split('_')[-1]}"
                                          for k, v in inf.items() if k.startswith("decode"))
                 + f" (bytes read per token), prefill {inf['prefill']:.2f}x (FLOPs per token); "
                 "measured on your hardware: evaluate.speed=true")
    return "\n".join(lines)


def show(cfg: config.Config) -> None:
    print(render(estimate(cfg), cfg.plan))


def main(argv: list[str] | None = None) -> int:
    return stage.main(show, "plan", __doc__, argv, also=("prune",))


if __name__ == "__main__":
    sys.exit(main())
