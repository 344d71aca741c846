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
import sys
import types

from recipes.lib import config, layout, search, stage
from recipes.lib.arch import Arch, distill_flops_per_token, prune_memory, shape_rows
from recipes.lib.layout import validate_layouts
from recipes.lib.train_config import TrainConfig
from recipes.lib.errors import Refusal

GB = 1024**3


@dataclasses.dataclass(kw_only=True)
class PlanConfig:
    teacher_config: str | None = None
    """The teacher's config.json, or its HF folder (no weights needed); default: convert.hf_path.
    The token budget is distill's (train_iters x global_batch_size x seq_length), the GPUs the
    cluster's (cluster.nodes.distill x cluster.gpus_per_node)."""
    gpu_memory_gb: float = 80.0
    """Memory per GPU (GiB): what a layout must fit."""
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989)."""
    mfu: float = 0.40
    """Assumed model FLOP utilisation of TP=1 PP=1 (docs/measured.md has what one GPU measured;
    a cluster's communication takes some of it); other layouts are slower by
    recipes/lib/layout.py's estimate."""
    inference_batch: int = 32
    """Batch of the larger decode estimate (KV cache bytes grow with it)."""

    def __post_init__(self):
        if not 0 < self.mfu <= 1:
            raise Refusal(f"plan.mfu={self.mfu} must be in (0, 1]")
        if self.gpu_memory_gb <= 0:
            raise Refusal(f"plan.gpu_memory_gb={self.gpu_memory_gb} must be > 0")


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


def estimate(cfg: config.Config) -> dict:
    """All the numbers `plan` prints, as a dict. `cfg` has a typed `plan` and, if the recipe
    prunes, a typed `prune` section."""
    p: PlanConfig = cfg.plan
    arch = teacher, student, drop = layout.models(cfg)
    prune = cfg.get("prune")
    searched = search_preview(teacher, prune, cfg, p) if prune and prune.searching else None
    validate_layouts((teacher, student), cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep,
                     "the recipe")
    nt, ns = teacher.num_params(), student.num_params()
    b, gpus = layout.budget(cfg), layout.training_gpus(cfg)
    lay, problem = {}, []
    for stage in ("prune", "teacher_correction", "distill"):
        try:
            lay[stage] = layout.stage_layout(cfg, stage, gpus, arch)
        except Refusal as e:  # printed as the plan's verdict; launch refuses with it
            problem.append(str(e))
    flops = distill_flops_per_token(teacher, student, b["seq_length"]) * b["tokens"]
    gpu_s = flops / (p.peak_tflops * 1e12 * p.mfu) * (
        lay["distill"].slowdown if "distill" in lay else 1)
    prune_seq = cfg.prune.seq_length if "prune" in cfg else 4096
    mem = {"convert (host RAM per process)":
           2 * teacher.padded_vocab_size * teacher.hidden_size * 2 / GB}
    if "prune" in lay:
        mem[f"prune (per GPU, TP=1 PP={lay['prune']})"] = prune_memory(
            teacher, prune_seq, lay["prune"]) / GB
    for stage in ("teacher_correction", "distill"):
        if stage in lay:
            mem[f"{stage} (per GPU, {lay[stage].describe().split(' (')[0]})"] = lay[stage].gb
    mem["export (host RAM, rank 0)"] = 2 * ns / GB
    return {
        "teacher": {**teacher.to_dict(), "params": nt,
                    "active_params": teacher.num_active_params()},
        "student": {**student.to_dict(), "params": ns,
                    "active_params": student.num_active_params()},
        "drop_layers_1indexed": drop, "gpus": gpus, "layouts": lay, "layout_problems": problem,
        "memory_gb": mem, "distill_memory": layout.memory_settings(cfg),
        "inference_speedup": inference_ratios(teacher, student, b["seq_length"],
                                              p.inference_batch),
        "distill": {**b, "flops": flops, "gpu_hours": gpu_s / 3600,
                    "wall_hours": gpu_s / 3600 / gpus},
        "search": searched and {**searched, "shapes": [
            {**{k: a.to_dict()[k] for k in search.hparams_of(teacher)}, "params": a.num_params(),
             **({"active_params": a.num_active_params()} if a.is_moe else {})}
            for a in searched["shapes"]]},
    }


def search_preview(teacher: Arch, c: search.Budget, cfg: config.Config, p: PlanConfig) -> dict:
    """What prune's search would consider (recipes/lib/search.py) and its tournament's cost."""
    s = c.search
    target = search.constraint(c, teacher)
    space, shapes = search.check_target(c, teacher, cfg.parallel.pp)
    top = shapes[:s.top_k]
    d, b = layout.distill_section(cfg), layout.budget(cfg)
    gbs, seq = b["global_batch_size"], b["seq_length"]
    steps = search.tournament_steps(s, gbs, seq)
    out = {"constraint": target, "space": space, "fitting": len(shapes), "shapes": top,
           "top_k": s.top_k, "tournament_steps": steps}
    if steps:
        tokens = steps * gbs * seq
        flops = sum(distill_flops_per_token(teacher, a, seq) for a in top) * tokens
        dc = types.SimpleNamespace(train_iters=steps, global_batch_size=gbs, seq_length=seq,
                                   micro_batch_size=b["micro_batch_size"],
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
    keys = shape_rows(bool(t.get("num_moe_experts")))
    lines = []
    if e.get("search"):
        sr = e["search"]
        lines += [f"prune searches {sr['constraint']}: ModelOpt's space "
                  + ", ".join(f"{k} {v}" for k, v in sr["space"].items())
                  + (f"; {sr['fitting']} shapes fit (our count), the top {sr['top_k']} by size:"
                     if "memory_mb" not in sr["constraint"] else
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
    if t["active_params"] != t["params"] or s["active_params"] != s["params"]:
        ta, sa = t["active_params"], s["active_params"]
        lines.append(f"| active parameters (per token) | {ta / 1e9:.2f}B | {sa / 1e9:.2f}B "
                     f"({sa / ta:.1%}) |")
    if e["drop_layers_1indexed"]:
        lines.append(f"\ndropped layers (1-indexed): {e['drop_layers_1indexed']}")
    lay = e["layouts"]
    lines.append(f"\non {e['gpus']} GPUs of {p.gpu_memory_gb:.0f} GB (cluster.nodes.distill x "
                 "cluster.gpus_per_node), the layouts make all and the launcher run "
                 "(cluster.layout sets one by hand; estimates, fitting "
                 f"{layout.HEADROOM:.0%} of a GPU):")
    for k, v in e["memory_gb"].items():
        fits = "" if "host" in k else ("  fits" if layout.fits(v, p.gpu_memory_gb)
                                       else "  DOES NOT FIT")
        lines.append(f"  {k:46s} {v:8.1f} GB{fits}")
    lines += [f"  {x}" for x in e["layout_problems"]]
    m = e["distill_memory"]
    lines.append(f"  (training counted with precision={m['precision']}, teacher_precision="
                 f"{m['teacher_precision']}, fp8_bf16_edge_layers={m['bf16_edge_layers']}, "
                 f"recompute_layers={m['recompute_layers']}, precision_aware_optimizer="
                 f"{str(m['precision_aware']).lower()}: the recipe's distill section)")
    d = e["distill"]
    at = (f" at {lay['distill'].describe().split(' (')[0]} (x{lay['distill'].slowdown:.2f} the "
          "time of TP=1 PP=1)") if "distill" in lay else ""
    lines.append(f"\ndistillation: {d['tokens'] / 1e9:.1f}B tokens = {d['train_iters']:,} steps "
                 f"of {d['global_batch_size']} x {d['seq_length']} (distill.train_iters, "
                 f"global_batch_size, seq_length); {d['flops']:.3g} FLOPs; "
                 f"~{d['gpu_hours']:,.0f} GPU-hours at {p.mfu:.0%} MFU of "
                 f"{p.peak_tflops:.0f} TFLOP/s{at} = ~{d['wall_hours']:.1f} h on {e['gpus']} GPUs")
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
    return stage.main(show, "plan", __doc__, argv, also=("prune", "cluster"))


if __name__ == "__main__":
    sys.exit(main())
