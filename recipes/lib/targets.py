"""Prune targets: the axes Minitron pruning cuts, under ModelOpt's names, and the student
architecture a set of targets gives (`pruned_arch`), every error a target can have raised before
any weights are read (prune, plan, the search)."""
from __future__ import annotations

from typing import Protocol

from recipes.lib.arch import FAMILIES, Arch
from recipes.lib.errors import Refusal

WIDTH_KEYS = ("hidden_size", "ffn_hidden_size", "num_attention_heads")
MOE_KEYS = ("num_moe_experts", "moe_ffn_hidden_size")  # ModelOpt's names for the MoE axes


def width_keys(arch: Arch) -> tuple[str, ...]:
    """The width axes prune can cut on `arch`: a mixture of experts swaps the dense FFN width
    for the expert count and each expert's FFN width."""
    if arch.is_moe:
        return ("hidden_size", "num_attention_heads", *MOE_KEYS)
    return WIDTH_KEYS


DEPTH_METHODS = ("drop_layers", "contiguous", "block_influence")
BUDGETS = ("target_params", "target_active_params", "target_memory_mb")  # instead of sizes


def budget(c) -> str | None:
    """The one budget PruneConfig `c` sets instead of sizes (a BUDGETS name), None for sizes;
    several budgets, a budget <= 0, or sizes beside a budget are refused."""
    named = [k for k in BUDGETS if getattr(c, k) is not None]
    if len(named) > 1:
        raise Refusal(f"set one of prune.{', prune.'.join(named)}, not several")
    if not named:
        return None
    if not getattr(c, named[0]) > 0:
        raise Refusal(f"prune.{named[0]} must be > 0, not {getattr(c, named[0])}")
    sizes = [k for k in (*WIDTH_KEYS, *MOE_KEYS, "num_layers", "drop_layers")
             if getattr(c, k) is not None]
    if sizes:
        raise Refusal(f"prune.{named[0]} searches the shape: unset {sizes} (or drop the "
                      "target and choose the sizes yourself)")
    return named[0]


class PruneTargets(Protocol):
    """What pruned_arch reads of a PruneConfig (or of a searched shape)."""
    hidden_size: int | None
    ffn_hidden_size: int | None
    num_attention_heads: int | None
    num_layers: int | None
    depth_method: str
    drop_layers: list | None
    num_moe_experts: int | None
    moe_ffn_hidden_size: int | None


def pruned_arch(t: Arch, c: PruneTargets) -> tuple[Arch, list[int] | None]:
    """The student architecture for prune targets `c` (a `PruneConfig`: the WIDTH_KEYS,
    num_layers, depth_method, drop_layers) and the explicit 1-indexed drop list (if any). Every
    error a target can have is raised here, before any weights are loaded (prune and plan)."""
    keys = width_keys(t)
    for k in {*WIDTH_KEYS, *MOE_KEYS} - {*keys}:
        if getattr(c, k, None) is not None:
            other = {"ffn_hidden_size": "prune.moe_ffn_hidden_size (each expert's width)"}.get(
                k, "the dense sizes (hidden_size, ffn_hidden_size, num_attention_heads)")
            raise Refusal(f"prune.{k}={getattr(c, k)}, but the teacher "
                          f"{'is a mixture of experts' if t.is_moe else 'has no experts'}: "
                          f"unset it and use {other}")
    new = {k: getattr(t, k) if getattr(c, k) is None else getattr(c, k) for k in keys}
    for k in keys:
        if new[k] > getattr(t, k) or new[k] < 1:
            raise Refusal(f"prune.{k}={new[k]} must be between 1 and the teacher's "
                          f"{getattr(t, k)}")
    if t.is_moe and new["num_moe_experts"] < t.moe_router_topk:
        raise Refusal(f"prune.num_moe_experts={new['num_moe_experts']} is fewer than the "
                      f"{t.moe_router_topk} experts each token is routed to (top-k); keep at "
                      f"least {t.moe_router_topk}")
    if new["num_attention_heads"] % t.num_query_groups:
        raise Refusal(f"prune.num_attention_heads={new['num_attention_heads']} must be a "
                      f"multiple of the {t.num_query_groups} KV groups (ModelOpt keeps every "
                      "group and trims heads within each)")
    if new["hidden_size"] % new["num_attention_heads"]:
        h, n = new["hidden_size"], new["num_attention_heads"]
        raise Refusal(f"prune.hidden_size={h} is not a multiple of num_attention_heads={n}: "
                      "transformers' LlamaConfig refuses such a model even with an explicit "
                      f"head_dim, so it could not be exported; use {h // n * n} or "
                      f"{(h // n + 1) * n}")
    drop = None
    layers = t.num_layers if c.num_layers is None else c.num_layers
    if c.depth_method == "drop_layers":
        if not c.drop_layers:
            raise Refusal("prune.depth_method=drop_layers needs prune.drop_layers=[...] "
                          "(1-indexed, as in the paper)")
        drop = [int(x) for x in c.drop_layers]
        bad = [x for x in drop if not 1 <= x <= t.num_layers]
        if bad:
            raise Refusal(f"prune.drop_layers has {bad} outside 1..{t.num_layers} (the list is "
                          f"1-indexed: HF model.layers.i is layer i+1)")
        dups = sorted({x for x in drop if drop.count(x) > 1})
        if dups:
            raise Refusal(f"prune.drop_layers lists {dups} more than once")
        if c.num_layers is not None and c.num_layers != t.num_layers - len(drop):
            raise Refusal(f"prune.num_layers={c.num_layers} but dropping {len(drop)} of "
                          f"{t.num_layers} layers leaves {t.num_layers - len(drop)}")
        layers = t.num_layers - len(drop)
        if layers < 1:
            raise Refusal("prune.drop_layers drops every layer")
    elif not 1 <= layers <= t.num_layers:
        raise Refusal(f"prune.num_layers={layers} must be between 1 and the teacher's "
                      f"{t.num_layers}")
    if t.is_moe and FAMILIES[t.family]["moe"]["ffn"] == "intermediate_size":
        new["ffn_hidden_size"] = new["moe_ffn_hidden_size"]  # Mixtral: one field for both
    return Arch(**{**t.to_dict(), **new, "num_layers": layers}), drop
