"""The parallel layout of a training stage, chosen from the models' shapes and the GPUs' memory
(and the checks every stage's layout must pass, `validate_layout`):
what `plan` prints and what `make all` / the Slurm launcher run unless the recipe sets
`cluster.layout.<stage>` by hand; and what both read of a recipe for it (the teacher's
architecture, the student's, distill's budget and memory settings, the cluster's GPUs).

Every TP x PP (x activation recompute: none, or every layer of a pipeline stage) that the
models, the GPU count and the global batch allow is priced by `arch.training_memory`; among
those that fit, the fastest by `slowdown`, the step time relative to TP=1 PP=1 without
recompute (the layout measured on one GPU, docs/measured.md):
- the pipeline bubble of 1F1B, (pp - 1) / m for m micro-batches per data-parallel rank;
- recompute, one more forward of the recomputed layers: their share of the student's forward
  over a step's model FLOPs (3x the student's forward + the teacher's);
- tensor parallelism, TP_COST per doubling: its all-reduces inside a node (an assumption from
  Megatron-LM's published scaling, not a measurement of ours);
- expert parallelism (mixtures of experts), EP_COST per doubling: the all-to-all of the routed
  tokens (an assumption too); EP shares the experts out over data-parallel ranks, so it must
  divide DP and every model's expert count.
Ties go to fewer model-parallel ranks. A layout fits where its estimate is within HEADROOM of
the GPU's memory: the rest is the CUDA context, NCCL's buffers and the allocator's
fragmentation, which the estimate leaves out.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

from recipes.lib import config, search
from recipes.lib.arch import Arch, prune_memory, training_memory
from recipes.lib.targets import pruned_arch
from recipes.lib.errors import MissingInput, Refusal
from recipes.lib.train_config import TrainConfig

GB = 1024**3
TP_COST = 0.05
EP_COST = 0.03
HEADROOM = 0.9


# ---- the checks of a layout (every stage that builds a model, and plan) ---------------------
def validate_layout(arch: Arch, tp: int, pp: int, ep: int = 1) -> None:
    """Parallel layout errors, before any weights are read."""
    if ep > 1 and not arch.is_moe:
        raise Refusal(f"parallel.ep={ep}: the model has no experts; use parallel.ep=1")
    if arch.is_moe and arch.num_moe_experts % ep:
        raise Refusal(f"parallel.ep={ep} does not divide num_moe_experts={arch.num_moe_experts}; "
                      "choose an EP that divides the expert count")
    for what, n in (("num_attention_heads", arch.num_attention_heads),
                    ("num_query_groups (KV heads)", arch.num_query_groups)):
        if n % tp:
            raise Refusal(f"parallel.tp={tp} does not divide {what}={n}; choose a TP that "
                          f"divides both heads ({arch.num_attention_heads}) and KV groups "
                          f"({arch.num_query_groups})")
    if arch.num_layers % pp:
        raise Refusal(f"parallel.pp={pp} does not divide num_layers={arch.num_layers}")


def validate_layouts(archs, tp: int, pp: int, ep: int, who: str) -> None:
    """The models one stage builds (a teacher and its student) at one layout: `ep` applies to
    the mixtures of experts among them (a dense teacher of an MoE student ignores it), and at
    least one must have experts for `ep` > 1."""
    for a in archs:
        validate_layout(a, tp, pp, ep if a.is_moe else 1)
    if ep > 1 and not any(a.is_moe for a in archs):
        raise Refusal(f"parallel.ep={ep}: no model of {who} has experts; use parallel.ep=1")


def fits(gb: float, memory_gb: float) -> bool:
    return gb <= HEADROOM * memory_gb


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    recompute_layers: int
    """Layers per pipeline stage recomputed in the backward (0: none)."""
    gb: float
    """Estimated memory per GPU, GiB."""
    slowdown: float
    """Estimated step time relative to TP=1 PP=1 without recompute, per GPU."""
    ep: int = 1
    """Expert-parallel ranks (a mixture of experts), within DP."""

    def describe(self) -> str:
        rc = f", recompute_layers={self.recompute_layers}" if self.recompute_layers else ""
        ep = f" EP={self.ep}" if self.ep > 1 else ""
        return f"TP={self.tp} PP={self.pp} DP={self.dp}{ep}{rc} ({self.gb:.1f} GB)"


def candidates(t: Arch | None, s: Arch, *, gpus: int, seq: int, global_batch: int,
               micro_batch: int, settings: dict, gpus_per_node: int = 8) -> list[Layout]:
    """Every layout of `gpus` GPUs training `s` against the frozen teacher `t` (None: teacher
    correction) that the shapes and the batch allow, fastest first. `settings`: the training
    section's memory settings (plan.memory_settings); a recompute_layers set there is kept."""
    fixed = settings.get("recompute_layers") or 0
    out = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8, 16):
            if tp > gpus_per_node or gpus % (tp * pp) or not valid(t, s, tp, pp, 1):
                continue
            dp = gpus // (tp * pp)
            if global_batch % (micro_batch * dp):
                continue
            micro = global_batch // (micro_batch * dp)
            for ep, recompute in itertools.product(
                    expert_parallel(t, s, tp, pp, dp),
                    (fixed,) if fixed else (0, s.num_layers // pp)):
                gb = training_memory(t, s, seq, tp, pp, dp, ep=ep, **{
                    **settings, "recompute_layers": recompute}) / GB
                out.append(Layout(tp, pp, dp, recompute, gb,
                                  slowdown(t, s, seq, tp, pp, micro, recompute)
                                  * (1 + EP_COST * math.log2(ep)), ep))
    return sorted(out, key=lambda x: (round(x.slowdown, 6), x.tp * x.pp, x.pp, x.ep))


def expert_parallel(t: Arch | None, s: Arch, tp: int, pp: int, dp: int) -> list[int]:
    """The expert-parallel sizes a TP x PP layout with `dp` data-parallel ranks can take: 1, and
    for mixtures of experts the powers of two dividing DP that the models allow."""
    return [ep for ep in (1, 2, 4, 8, 16, 32, 64) if dp % ep == 0 and valid(t, s, tp, pp, ep)]


def valid(t: Arch | None, s: Arch, tp: int, pp: int, ep: int) -> bool:
    try:
        validate_layouts([a for a in (t, s) if a is not None], tp, pp, ep, "the layout")
    except ValueError:
        return False
    return True


def slowdown(t: Arch | None, s: Arch, seq: int, tp: int, pp: int, micro: int,
             recompute: int) -> float:
    bubble = 1 + (pp - 1) / micro
    step = 3 * s.flops_per_token(seq) + (t.flops_per_token(seq) if t else 0)
    again = s.flops_per_token(seq) * recompute / (s.num_layers // pp) / step
    return bubble * (1 + again) * (1 + TP_COST * math.log2(tp))


def choose(options: list[Layout], memory_gb: float, what: str) -> Layout:
    """The fastest of `options` that fits `memory_gb`; a ValueError naming the closest miss and
    the fixes where none does."""
    ok = [x for x in options if fits(x.gb, memory_gb)]
    if ok:
        return ok[0]
    if not options:
        raise Refusal(f"{what}: no TP x PP divides the models, the GPUs and the global batch: "
                      "use a GPU count that is a power of two, or set cluster.layout")
    best = min(options, key=lambda x: x.gb)
    raise Refusal(f"{what}: no layout fits {HEADROOM:.0%} of {memory_gb:.0f} GB per GPU (the "
                  f"smallest: {best.describe()}): add GPUs (cluster.nodes), lower "
                  "seq_length, or set precision_aware_optimizer=true")


def prune_pp(t: Arch, seq: int, gpus: int, memory_gb: float) -> int:
    """The fewest pipeline stages (TP=1, ModelOpt's requirement) whose forward-only pruning
    fits `memory_gb`, at most `gpus`."""
    for pp in (1, 2, 4, 8, 16):
        if pp <= gpus and t.num_layers % pp == 0 and fits(prune_memory(t, seq, pp) / GB,
                                                          memory_gb):
            return pp
    raise Refusal(f"prune: the teacher's forward does not fit {memory_gb:.0f} GB per GPU at "
                  f"any pipeline size up to {gpus} GPUs: add GPUs or lower prune.seq_length")


# ---- a recipe's layouts: what plan prints and launch runs -------------------------------------
def distill_section(cfg: config.Config, name: str = "distill") -> dict:
    """A training section's settings as written (plan and launch type only their own): distill's,
    or teacher_correction's."""
    d = cfg.get(name)
    return d if isinstance(d, dict) else {}


def memory_settings(cfg: config.Config, name: str = "distill") -> dict:
    """The settings of training section `name` that change its memory (training_memory's
    keywords): the precision-aware optimizer, fp8 for the student, or the teacher too (never by
    default), and activation recompute."""
    d = distill_section(cfg, name)
    return {"precision_aware": bool(d.get("precision_aware_optimizer")),
            "precision": d.get("precision", "auto"),
            "teacher_precision": d.get("teacher_precision") or "bf16",
            "bf16_edge_layers": int(d.get("fp8_bf16_edge_layers") or 0),
            "recompute_layers": int(d.get("recompute_layers") or 0)}


def budget(cfg: config.Config, name: str = "distill") -> dict:
    """The run as training section `name` sets it (TrainConfig's defaults, the paper's, for what
    it leaves out): distill's is the one source of the token budget."""
    d = distill_section(cfg, name)
    b = {k: int(d.get(k, getattr(TrainConfig, k))) for k in
         ("train_iters", "global_batch_size", "micro_batch_size", "seq_length")}
    return {**b, "tokens": b["train_iters"] * b["global_batch_size"] * b["seq_length"]}


def teacher_arch(cfg: config.Config) -> Arch:
    """The teacher's architecture: plan.teacher_config, else convert.hf_path's config.json."""
    path = cfg.section("plan").teacher_config or (cfg.get("convert") or {}).get("hf_path")
    if not path or path == "???":
        raise Refusal("plan needs the teacher's config.json: set plan.teacher_config (a "
                      "config.json or an HF folder) or convert.hf_path")
    p = Path(path)
    if p.is_dir():
        return Arch.from_hf_dir(p)
    if not p.is_file():
        raise MissingInput(f"plan.teacher_config={path}: no such file or folder")
    return Arch.from_hf_config(json.loads(p.read_text()), str(p))


def models(cfg: config.Config) -> tuple[Arch, Arch, list | None]:
    """(teacher, student, layers dropped 1-indexed): the student prune makes, or, for a search,
    the largest shape it would consider."""
    teacher = teacher_arch(cfg)
    prune = cfg.typed("prune") if "prune" in cfg else None
    if prune is None:
        return teacher, teacher, None
    if prune.searching:
        return teacher, search.check_target(prune, teacher, cfg.parallel.pp)[1][0], None
    return (teacher, *pruned_arch(teacher, prune))


def training_gpus(cfg: config.Config, stage: str = "distill") -> int:
    """The cluster's GPUs for a training stage: cluster.nodes.<stage> x gpus_per_node."""
    c = cfg.section("cluster")
    return int(c.nodes.get(stage, 1)) * c.gpus_per_node


def stage_layout(cfg: config.Config, stage: str, gpus: int | None = None,
                 arch: tuple | None = None):
    """What a GPU stage runs at on `gpus` GPUs (default: the cluster's): prune's pipeline size,
    or distill's / teacher_correction's Layout. A layout set by hand in cluster.layout is kept
    (and priced), the rest chosen here; raises where none fits, or where the hand's does not
    divide the models, the GPUs and the batch. `arch`: models(cfg), where known."""
    t, s = (arch or models(cfg))[:2]
    p, c = cfg.section("plan"), cfg.section("cluster")
    gpus = gpus or training_gpus(cfg)
    hand = c.layout.get(stage)
    if stage == "prune":
        seq = cfg.typed("prune").seq_length if "prune" in cfg else 4096
        return hand["pp"] if hand else prune_pp(t, seq, gpus, p.gpu_memory_gb)
    b = budget(cfg, stage)  # each training stage at its own sequence, batch and settings
    options = candidates(t if stage == "distill" else None, s if stage == "distill" else t,
                         gpus=gpus, seq=b["seq_length"], global_batch=b["global_batch_size"],
                         micro_batch=b["micro_batch_size"], settings=memory_settings(cfg, stage),
                         gpus_per_node=c.gpus_per_node)
    if not hand:
        return choose(options, p.gpu_memory_gb, f"{stage} on {gpus} GPUs")
    same = [x for x in options
            if (x.tp, x.pp, x.ep) == (hand["tp"], hand["pp"], hand.get("ep", 1))]
    if not same:
        raise Refusal(f"cluster.layout.{stage}={hand} does not divide the models, the {gpus} "
                      "GPUs and the global batch: remove it to let plan choose, or pick another")
    return same[0]
