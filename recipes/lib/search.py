"""Prune to a budget (`prune.target_params` / `target_active_params` / `target_memory_mb`), the
part that needs no weights: the settings (`SearchConfig`, `prune.search`), the constraint
ModelOpt searches under, which shapes can be exported, and the search space and the
tournament's cost as `plan` and the Slurm launcher see them before anything runs. The search
itself and the tournament run in recipes/lib/tournament.py.

The method. ModelOpt's `mcore_minitron` searcher, on the importance the prune stage's one
calibration pass measured, enumerates the pruned shapes under the constraint (each width hparam
at most `max_width_pruning`, depth at most `max_depth_pruning` below the teacher, on the grid of
the `*_divisor` settings), rejects shapes `transformers` could not load or the output layout
could not hold (`candidate_filter`), ranks them by size and scores the top `top_k` zero-shot
(held-out LM loss). The Minitron papers: rankings right after pruning differ from rankings
after light retraining, so a tournament (`tournament_steps` or `tournament_tokens`) distils
each of the top-K briefly from the teacher and the best held-out score wins.

torch, megatron and ModelOpt are imported inside the functions that need them (`# lazy`): the
launcher and every stage's config check import this module.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Protocol

from recipes.lib.arch import Arch, megatron_moe
from recipes.lib.targets import BUDGETS, MOE_KEYS, WIDTH_KEYS, pruned_arch, width_keys
from recipes.lib.errors import Refusal

if typing.TYPE_CHECKING:  # torch at import: this module stays light (see the module doc)
    from recipes.lib.train_config import KDConfig

HPARAMS = (*WIDTH_KEYS, *MOE_KEYS, "num_layers")  # a dense teacher's, or a mixture of experts'
SCORE_NAMES = {"kd_loss": "KD loss", "lm_loss": "LM loss", "lm_eval": "lm-eval score"}


def hparams_of(teacher: Arch) -> tuple[str, ...]:
    """The axes the search may cut on `teacher` (ModelOpt's names)."""
    return (*width_keys(teacher), "num_layers")


@dataclasses.dataclass(kw_only=True)
class SearchConfig:
    """`prune.search`: the search grid and the tournament (with prune.target_*)."""
    hparams: list | None = None
    """What the search may shrink (None: every axis of the teacher: hidden_size,
    num_attention_heads, num_layers, and ffn_hidden_size for a dense model, num_moe_experts and
    moe_ffn_hidden_size for a mixture of experts); the others stay the teacher's."""
    max_width_pruning: float = 0.4
    """Each width hparam at most this fraction below the teacher's (ModelOpt's default)."""
    max_depth_pruning: float = 0.2
    """Layers at most this fraction below the teacher's (ModelOpt's default)."""
    top_k: int = 4
    """Candidates scored (and run in the tournament), the largest that fit."""
    hidden_size_divisor: int = 256
    """The search grid of hidden sizes (ModelOpt's default; small models need less)."""
    ffn_hidden_size_divisor: int = 512
    """The search grid of FFN sizes (an expert's FFN too)."""
    num_moe_experts_divisor: int = 8
    """The search grid of expert counts (ModelOpt's default)."""
    num_layers_divisor: int = 2
    """The search grid of layer counts."""
    tournament_steps: int = 0
    """Distillation steps per candidate (0, and no tournament_tokens: the zero-shot ranking
    decides)."""
    tournament_tokens: int = 0
    """Instead of steps: tokens per candidate, rounded up to whole steps."""
    score: str = "kd_loss"
    """What the tournament ranks by: kd_loss | lm_loss (held-out, lower wins) | lm_eval
    (higher wins)."""
    lm_eval_task: typing.Any = None
    """score=lm_eval: a task name (heldout_cloze, or a local task) or {task, num_fewshot,
    metric}."""
    lm_eval_task_paths: list = dataclasses.field(default_factory=list)
    """Folders of local lm-eval task YAMLs (nothing is downloaded)."""
    lm_eval_limit: int | None = None
    """Documents per candidate (None: all)."""
    keep_tournament: bool = False
    """Keep each candidate's tournament-distilled checkpoint (<prune>/tournament/c<i>)."""
    teacher_cache: bool = True
    """Record the teacher's logits once and replay them to every candidate."""
    teacher_cache_top_k: int | None = None
    """K: top-K logits; None: the full vocabulary if it fits, else top-K
    (recipes/lib/logit_cache.py)."""
    teacher_cache_max_gb: float = 16.0
    """The teacher cache's disk budget."""

    def __post_init__(self):
        bad = sorted(set(self.hparams or ()) - set(HPARAMS))
        if bad or self.hparams == []:
            raise Refusal(f"prune.search.hparams={self.hparams}: choose among {list(HPARAMS)}")
        for k in ("max_width_pruning", "max_depth_pruning"):
            if not 0 <= getattr(self, k) < 1:
                raise Refusal(f"prune.search.{k}={getattr(self, k)} must be in [0, 1)")
        for k in ("top_k", "hidden_size_divisor", "ffn_hidden_size_divisor", "num_layers_divisor",
                  "num_moe_experts_divisor"):
            if getattr(self, k) < 1:
                raise Refusal(f"prune.search.{k}={getattr(self, k)} must be a whole number "
                              ">= 1")
        for k in ("tournament_steps", "tournament_tokens"):
            if getattr(self, k) < 0:
                raise Refusal(f"prune.search.{k}={getattr(self, k)} must be a whole number "
                              ">= 0")
        if self.tournament_steps and self.tournament_tokens:
            raise Refusal("set prune.search.tournament_steps or tournament_tokens, not both")
        if self.score not in SCORE_NAMES:
            raise Refusal(f"prune.search.score={self.score!r}: use one of {list(SCORE_NAMES)}")
        if (self.score == "lm_eval") != (self.lm_eval_task is not None):
            raise Refusal("prune.search.score=lm_eval and prune.search.lm_eval_task go "
                          "together: name the task (e.g. heldout_cloze, or a local task with "
                          "lm_eval_task_paths) or score by kd_loss / lm_loss")
        if self.teacher_cache_top_k is not None and self.teacher_cache_top_k < 1:
            raise Refusal(f"prune.search.teacher_cache_top_k={self.teacher_cache_top_k!r}: a "
                          "whole number >= 1, or null (the full vocabulary when the cache "
                          "fits teacher_cache_max_gb)")
        if not self.teacher_cache_max_gb > 0:
            raise Refusal(f"prune.search.teacher_cache_max_gb={self.teacher_cache_max_gb} "
                          "must be > 0")

    @property
    def tournament(self) -> bool:
        return bool(self.tournament_steps or self.tournament_tokens)

    def skipped(self, teacher: Arch) -> list[str] | None:
        """The hparams the search keeps at the teacher's (ModelOpt's hparams_to_skip)."""
        return [h for h in hparams_of(teacher) if h not in self.chosen(teacher)] or None

    def chosen(self, teacher: Arch) -> list[str]:
        """The hparams the search may shrink on `teacher`; one it does not have is refused."""
        axes = hparams_of(teacher)
        if self.hparams is None:
            return list(axes)
        if bad := [h for h in self.hparams if h not in axes]:
            raise Refusal(f"prune.search.hparams names {bad}, which the teacher "
                          f"{'(a mixture of experts)' if teacher.is_moe else '(dense)'} does "
                          f"not have; choose among {list(axes)}")
        return list(self.hparams)


class Budget(Protocol):
    """What the search reads of a PruneConfig (prune's stage module holds the class)."""
    target_params: float | None
    target_active_params: float | None
    target_memory_mb: float | None
    search: SearchConfig | None
    micro_batch_size: int


def tournament_steps(s: SearchConfig, gbs: int, seq: int) -> int:
    """Steps per candidate: tournament_steps, or tournament_tokens rounded up to whole steps of
    the distill section's global batch (0: no tournament)."""
    return s.tournament_steps or -(-s.tournament_tokens // (gbs * seq))


def cache_plan(s: SearchConfig, dc: KDConfig, teacher: Arch) -> dict | None:
    """The teacher cache a tournament of `dc` (a KDConfig, or its fields) would use
    (logit_cache.choose), None when off."""
    from recipes.lib import logit_cache  # lazy: torch and megatron (see the module doc)

    if not s.teacher_cache:
        return None
    if dc.intermediate_layer_pairs:  # those losses need the teacher's own layers
        return {"encoding": "online", "why": "distill.intermediate_layer_pairs need the "
                "teacher's layers"}
    sequences = (dc.train_iters + dc.eval_iters) * dc.global_batch_size
    dtype = "fp32" if dc.teacher_precision == "fp32" else "bf16"
    return logit_cache.choose(sequences * dc.seq_length, sequences // dc.micro_batch_size,
                              teacher.padded_vocab_size, teacher.vocab_size, dtype,
                              s.teacher_cache_top_k, s.teacher_cache_max_gb)


def constraint(c: Budget, teacher: Arch) -> dict:
    """ModelOpt's constraint for a PruneConfig `c`: {'params': n} or {'active_params': n} (a
    fraction <= 1 of the teacher's, or absolute) or {'memory_mb': mb}. ModelOpt counts the
    padded vocabulary, so the recipe's own count (real vocabulary) of a chosen shape is never
    above the target."""
    for key, active in (("target_params", False), ("target_active_params", True)):
        if (n := getattr(c, key)) is not None:
            n = n * teacher.num_params(active) if n <= 1 else n
            return {"active_params" if active else "params": float(n)}
    return {"memory_mb": float(c.target_memory_mb)}


def arch_of(teacher: Arch, ss_config: dict) -> Arch | None:
    """The architecture of a searched shape, or None when it cannot be exported (the checks of
    pruned_arch: heads a multiple of the KV groups, hidden a multiple of heads)."""
    want = {k: ss_config.get(k) if k in hparams_of(teacher) else None for k in HPARAMS}
    c = types.SimpleNamespace(**want, depth_method="block_influence", drop_layers=None)
    try:
        return pruned_arch(teacher, c)[0]
    except ValueError:
        return None


def candidate_filter(teacher: Arch, pp: int):
    def ok(cfg: dict) -> bool:
        a = arch_of(teacher, cfg)
        return a is not None and a.num_layers % pp == 0
    return ok


def modelopt_view(arch: Arch):
    """What ModelOpt's analytic counters (megatron_model_stats) read of a megatron config."""
    return types.SimpleNamespace(
        hidden_size=arch.hidden_size, num_layers=arch.num_layers,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim, gated_linear_unit=True, add_bias_linear=False,
        normalization="RMSNorm", qk_layernorm=arch.qk_norm, **megatron_moe(arch))


def measure(teacher: Arch, target: dict, ss_config: dict) -> float:
    """A shape (ModelOpt's ss_config over the teacher; {} is the teacher) as ModelOpt measures it
    for the constraint: its parameter count, total or active (the padded vocabulary), or its
    memory estimate (bf16 weights + the KV cache of one 4096-token sequence, the searcher's
    defaults)."""
    from recipes.lib import modelopt_local  # lazy: megatron and ModelOpt (see the module doc)

    modelopt_local.enable()  # ModelOpt's megatron plugins import megatron: after compat
    # lazy: importable only after modelopt_local.enable()
    from modelopt.torch.nas.plugins.megatron_model_stats import (
        mcore_memory_footprint_mb,
        mcore_param_count,
    )

    args = (modelopt_view(teacher), teacher.padded_vocab_size, teacher.tie_embeddings)
    shape = {k: ss_config[k] for k in hparams_of(teacher) if k in ss_config}
    if "params" in target or "active_params" in target:
        return float(mcore_param_count(*args, **shape)["active_params" in target])
    return float(mcore_memory_footprint_mb(*args, dtype_bytes=2, sequence_length=4096,
                                           batch_size=1, **shape)[3])


def grid(teacher: Arch, s: SearchConfig, target: dict, pp: int) -> tuple[dict, list, list]:
    """Before any weights (plan, and prune before calibration): the search space ModelOpt builds
    for `teacher` (its hparam choices on the divisor grid, cut by ModelOpt's own max_*_pruning
    rule); the shapes that pass the filter and fit the target as ModelOpt measures it, largest
    first; and every shape that passes the filter, as (measure, Arch), smallest first."""
    from recipes.lib import modelopt_local  # lazy: megatron and ModelOpt (see the module doc)

    modelopt_local.enable()  # ModelOpt's megatron plugin, with or without TE
    # lazy: importable only after modelopt_local.enable()
    from modelopt.torch.prune.plugins.mcore_minitron import MCoreMinitronSearcher

    def multiples(top: int, step: int) -> list[int]:
        return sorted({*range(step, top + 1, step), top})

    choices = {"hidden_size": multiples(teacher.hidden_size, s.hidden_size_divisor),
               "ffn_hidden_size": multiples(teacher.ffn_hidden_size, s.ffn_hidden_size_divisor),
               "num_attention_heads": multiples(teacher.num_attention_heads,
                                                teacher.num_query_groups),
               "num_layers": multiples(teacher.num_layers, s.num_layers_divisor)}
    if teacher.is_moe:  # no dense FFN: each expert's, and the expert count
        del choices["ffn_hidden_size"]
        choices.update(moe_ffn_hidden_size=multiples(teacher.moe_ffn_hidden_size,
                                                     s.ffn_hidden_size_divisor),
                       num_moe_experts=[n for n in multiples(teacher.num_moe_experts,
                                                             s.num_moe_experts_divisor)
                                        if n >= teacher.moe_router_topk])
    combos = MCoreMinitronSearcher._generate_search_space_combos(
        choices, s.max_width_pruning, s.max_depth_pruning, s.skipped(teacher))
    space = {k: sorted({c[k] for c in combos if k in c}) for k in hparams_of(teacher)}
    ok = candidate_filter(teacher, pp)
    key = next(iter(target))
    loadable = sorted(((measure(teacher, target, c), a) for c in combos
                       if ok(c) and (a := arch_of(teacher, c)) is not None),
                      key=lambda x: x[0])
    fits = [a for m, a in loadable if m <= target[key]]
    return space, sorted(fits, key=lambda a: -a.num_params(key == "active_params")), loadable


def check_target(c: Budget, teacher: Arch, pp: int) -> tuple[dict, list[Arch]]:
    """The budget of PruneConfig `c` against what the search can reach, before any weights:
    refused when it is at or above the teacher (nothing to prune) or when no shape on the grid
    meets it (naming the smallest reachable size and the settings that widen the grid).
    Returns grid()'s space and fitting shapes."""
    target = constraint(c, teacher)
    key = next(iter(target))
    name = "prune." + next(k for k in BUDGETS if getattr(c, k) is not None)
    unit = (lambda v: f"{v:,.1f} MB") if key == "memory_mb" else (
        lambda v: f"{v:,.0f} {'active ' if key == 'active_params' else ''}parameters")
    mine = measure(teacher, target, {})
    if target[key] >= mine:
        raise Refusal(f"{name}={getattr(c, name.split('.')[1]):g} asks for {unit(target[key])}"
                      f", at or above the teacher's own {unit(mine)} (as ModelOpt counts "
                      "it): nothing to prune; give a smaller target (a fraction < 1 of the "
                      "teacher's, or an absolute size)")
    space, fits, loadable = grid(teacher, c.search, target, pp)
    if not fits:
        size, arch = loadable[0]
        axes = hparams_of(teacher)
        fixed = [k for k in c.search.chosen(teacher) if space[k] in ([], [getattr(teacher, k)])]
        raise Refusal(
            f"no shape on the search grid meets {name} ({unit(target[key])}): the smallest "
            f"reachable is {unit(size)} ({', '.join(f'{k} {getattr(arch, k)}' for k in axes)})"
            f". Raise the target to at least that, or widen the grid: prune.search."
            f"max_width_pruning={c.search.max_width_pruning} / max_depth_pruning="
            f"{c.search.max_depth_pruning}, the divisors (hidden_size_divisor="
            f"{c.search.hidden_size_divisor}, ffn_hidden_size_divisor="
            f"{c.search.ffn_hidden_size_divisor}, num_layers_divisor="
            f"{c.search.num_layers_divisor}"
            + (f", num_moe_experts_divisor={c.search.num_moe_experts_divisor}"
               if teacher.is_moe else "") + ")"
            + (f"; {', '.join(fixed)} cannot shrink on this grid at all (a divisor at least "
               "the size, or a max_*_pruning too small to reach the next choice)" if fixed
               else ""))
    return space, fits
