"""HF (Llama, Mistral, Qwen2, Qwen3) <-> megatron-core GPTModel (local layer spec) weight mapping,
as data.

Each `Rule` names one megatron parameter, the HF tensors it is made of, and how it is laid out
across tensor-parallel ranks. The two fusions megatron uses are written once each:
- QKV: per query group g, rows [q heads of g ..., k_g, v_g] (each head `head_dim` rows);
- GLU: linear_fc1 = [gate; up], and each TP rank holds [gate_r; up_r].
A family is the shared Llama table plus the rules of what it adds (Qwen2: Q/K/V biases, fused
like their weights; Qwen3: per-head Q/K norms), chosen by the architecture's flags: a new table,
not new code paths. A mixture of experts swaps the dense MLP's rules for its family's MoE rules
(`MOE_RULES`: the router, and each expert's GLU fc1 and fc2 under an `{e}` placeholder, the
expert's global index; Qwen2-MoE's shared expert, a GLU MLP sharded over TP like a dense one,
and its sigmoid gate). megatron's checkpoints hold the experts as one tensor with a leading
expert axis after the layer axis (`decoder.layers.mlp.experts.experts.linear_fc1.weight`),
whatever the expert-parallel size; a rank's parameters name its local experts
(`local_experts.{j}`), which `local_params` turns into global indices.
"""
from __future__ import annotations

import dataclasses
import re
from enum import Enum

import torch

from recipes.lib.arch import Arch


class TP(Enum):
    REPLICATED = "replicated"   # same on every TP rank (norms)
    COLUMN = "column"           # split along dim 0 (output features)
    ROW = "row"                 # split along dim 1 (input features)
    VOCAB = "vocab"             # dim 0, after padding the vocab to Arch.padded_vocab_size
    GLU = "glu"                 # dim 0 of each half of [gate; up]


class Fuse(Enum):
    NONE = "none"
    QKV = "qkv"
    GLU = "glu"


@dataclasses.dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    tp: TP
    fuse: Fuse = Fuse.NONE
    untied_only: bool = False  # present only when input and output embeddings are separate


L_MC, L_HF = "decoder.layers.{i}.", "model.layers.{i}."
LLAMA_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), TP.VOCAB),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), TP.REPLICATED),
    Rule("output_layer.weight", ("lm_head.weight",), TP.VOCAB, untied_only=True),
    Rule(L_MC + "input_layernorm.weight", (L_HF + "input_layernorm.weight",), TP.REPLICATED),
    Rule(L_MC + "self_attention.linear_qkv.weight",
         tuple(L_HF + f"self_attn.{p}_proj.weight" for p in "qkv"), TP.COLUMN, Fuse.QKV),
    Rule(L_MC + "self_attention.linear_proj.weight", (L_HF + "self_attn.o_proj.weight",), TP.ROW),
    Rule(L_MC + "pre_mlp_layernorm.weight", (L_HF + "post_attention_layernorm.weight",),
         TP.REPLICATED),
    Rule(L_MC + "mlp.linear_fc1.weight",
         (L_HF + "mlp.gate_proj.weight", L_HF + "mlp.up_proj.weight"), TP.GLU, Fuse.GLU),
    Rule(L_MC + "mlp.linear_fc2.weight", (L_HF + "mlp.down_proj.weight",), TP.ROW),
)
# Qwen2: biases of Q, K, V, fused and sharded like the weights they belong to
QKV_BIAS_RULES = (
    Rule(L_MC + "self_attention.linear_qkv.bias",
         tuple(L_HF + f"self_attn.{p}_proj.bias" for p in "qkv"), TP.COLUMN, Fuse.QKV),
)
# Qwen3: RMSNorm over each head's head_dim of Q and of K (the same weights for every head)
QK_NORM_RULES = (
    Rule(L_MC + "self_attention.q_layernorm.weight", (L_HF + "self_attn.q_norm.weight",),
         TP.REPLICATED),
    Rule(L_MC + "self_attention.k_layernorm.weight", (L_HF + "self_attn.k_norm.weight",),
         TP.REPLICATED),
)

# The TE layer spec fuses each norm into the linear after it: its parameter names (not its
# checkpoint keys, which megatron keeps identical) differ from the local spec's rule names.
TE_PARAM_ALIASES = {
    L_MC + "self_attention.linear_qkv.layer_norm_weight": L_MC + "input_layernorm.weight",
    L_MC + "mlp.linear_fc1.layer_norm_weight": L_MC + "pre_mlp_layernorm.weight",
}


def _moe_rules(router: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """A family's MoE block: the HF names of its router and of expert e's gate, up and down."""
    e = L_MC + "mlp.experts.local_experts.{e}."
    return (Rule(L_MC + "mlp.router.weight", (L_HF + router,), TP.REPLICATED),
            Rule(e + "linear_fc1.weight", (L_HF + gate, L_HF + up), TP.GLU, Fuse.GLU),
            Rule(e + "linear_fc2.weight", (L_HF + down,), TP.ROW))


MOE_RULES = {
    "qwen3_moe": _moe_rules("mlp.gate.weight", "mlp.experts.{e}.gate_proj.weight",
                            "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight"),
    "mixtral": _moe_rules("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.w1.weight",
                          "block_sparse_moe.experts.{e}.w3.weight",
                          "block_sparse_moe.experts.{e}.w2.weight"),
}
MOE_RULES["qwen2_moe"] = MOE_RULES["qwen3_moe"] + (  # and a shared expert with a sigmoid gate
    Rule(L_MC + "mlp.shared_experts.linear_fc1.weight",
         (L_HF + "mlp.shared_expert.gate_proj.weight", L_HF + "mlp.shared_expert.up_proj.weight"),
         TP.GLU, Fuse.GLU),
    Rule(L_MC + "mlp.shared_experts.linear_fc2.weight",
         (L_HF + "mlp.shared_expert.down_proj.weight",), TP.ROW),
    Rule(L_MC + "mlp.shared_experts.gate_weight", (L_HF + "mlp.shared_expert_gate.weight",),
         TP.REPLICATED))
DENSE_MLP = (L_MC + "mlp.linear_fc1.weight", L_MC + "mlp.linear_fc2.weight")


def rules_for(arch: Arch) -> tuple[Rule, ...]:
    rules = LLAMA_RULES + QKV_BIAS_RULES * arch.qkv_bias + QK_NORM_RULES * arch.qk_norm
    if arch.is_moe:
        rules = tuple(r for r in rules if r.megatron not in DENSE_MLP) + MOE_RULES[arch.family]
    return tuple(r for r in rules if not (r.untied_only and arch.tie_embeddings))


def is_expert(rule: Rule) -> bool:
    """The rule is one expert's weight (sharded over expert-parallel ranks and expert TP)."""
    return "{e}" in rule.megatron


def expand(arch: Arch, layers: range | None = None):
    """Yield (rule, megatron_name, hf_names) for every tensor; `layers` = global layer indices,
    each layer's experts by global index."""
    layers = range(arch.num_layers) if layers is None else layers
    for r in rules_for(arch):
        if "{i}" in r.megatron:
            for i in layers:
                for e in range(arch.num_moe_experts) if is_expert(r) else (None,):
                    yield (r, r.megatron.format(i=i, e=e),
                           tuple(h.format(i=i, e=e) for h in r.hf))
        else:
            yield r, r.megatron, r.hf


def hf_names(arch: Arch) -> set[str]:
    return {h for _, _, hs in expand(arch) for h in hs}


def hf_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: the shape its config.json implies} for every tensor convert reads."""
    h, d, f, v = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size, arch.vocab_size
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    top = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}
    layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
             "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
             "self_attn.v_proj.weight": (kv, h), "self_attn.q_proj.bias": (q,),
             "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
             "self_attn.o_proj.weight": (h, q), "self_attn.q_norm.weight": (d,),
             "self_attn.k_norm.weight": (d,), "mlp.gate_proj.weight": (f, h),
             "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
    if arch.is_moe:
        fe, (router, gate, up, down) = arch.moe_ffn_hidden_size, (
            h for r in MOE_RULES[arch.family][:3] for h in r.hf)
        s = arch.moe_shared_expert_intermediate_size
        layer.update({router.removeprefix(L_HF): (arch.num_moe_experts, h),
                      gate.removeprefix(L_HF): (fe, h), up.removeprefix(L_HF): (fe, h),
                      down.removeprefix(L_HF): (h, fe), "mlp.shared_expert.gate_proj.weight":
                      (s, h), "mlp.shared_expert.up_proj.weight": (s, h),
                      "mlp.shared_expert.down_proj.weight": (h, s),
                      "mlp.shared_expert_gate.weight": (1, h)})

    def shape(name: str) -> tuple[int, ...]:
        m = re.match(r"model\.layers\.\d+\.(.*)", name)
        if not m:
            return top[name]
        return layer[re.sub(r"\.experts\.\d+\.", ".experts.{e}.", m.group(1))]

    return {n: shape(n) for n in hf_names(arch)}


# ---- fusion: HF tensors <-> one global (unsharded) megatron tensor --------------------------
def fuse(rule: Rule, tensors: list[torch.Tensor], arch: Arch) -> torch.Tensor:
    if rule.fuse is Fuse.QKV:  # weights [n, hidden] and biases [n] alike
        q, k, v = tensors
        g, d = arch.num_query_groups, arch.head_dim
        per = arch.num_attention_heads // g
        rest = q.shape[1:]
        return torch.cat([q.reshape(g, per * d, *rest), k.reshape(g, d, *rest),
                          v.reshape(g, d, *rest)], dim=1).reshape(-1, *rest)
    if rule.fuse is Fuse.GLU:
        return torch.cat(tensors, dim=0)
    (t,) = tensors
    if rule.tp is TP.VOCAB and t.shape[0] != arch.padded_vocab_size:
        t = torch.cat([t, t.new_zeros(arch.padded_vocab_size - t.shape[0], *t.shape[1:])])
    return t


def split(rule: Rule, t: torch.Tensor, arch: Arch) -> list[torch.Tensor]:
    if rule.fuse is Fuse.QKV:
        g, d = arch.num_query_groups, arch.head_dim
        per = arch.num_attention_heads // g
        rest = t.shape[1:]
        x = t.reshape(g, (per + 2) * d, *rest)
        q, k, v = x[:, : per * d], x[:, per * d: (per + 1) * d], x[:, (per + 1) * d:]
        return [y.reshape(-1, *rest).contiguous() for y in (q, k, v)]
    if rule.fuse is Fuse.GLU:
        return [y.contiguous() for y in t.chunk(2, dim=0)]
    if rule.tp is TP.VOCAB:
        return [t[: arch.vocab_size].contiguous()]
    return [t]


# ---- tensor parallelism: one global tensor <-> the local shard of each rank ------------------
def shard(rule: Rule, t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    if tp == 1 or rule.tp is TP.REPLICATED:
        return t
    if rule.tp is TP.GLU:
        return torch.cat([h.chunk(tp, dim=0)[rank] for h in t.chunk(2, dim=0)], dim=0)
    return t.chunk(tp, dim=1 if rule.tp is TP.ROW else 0)[rank]


def unshard(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    if len(shards) == 1 or rule.tp is TP.REPLICATED:
        return shards[0]
    if rule.tp is TP.GLU:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=1 if rule.tp is TP.ROW else 0)


def global_shape(rule: Rule, arch: Arch) -> tuple[int, ...]:
    """Shape of the unsharded megatron tensor, from the architecture alone."""
    h, d = arch.hidden_size, arch.head_dim
    name = rule.megatron
    if rule.tp is TP.VOCAB:
        return (arch.padded_vocab_size, h)
    if rule.fuse is Fuse.QKV:
        n = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
        return (n,) if name.endswith(".bias") else (n, h)
    if name.endswith(("q_layernorm.weight", "k_layernorm.weight")):
        return (d,)
    if name.endswith("router.weight"):
        return (arch.num_moe_experts, h)
    if name.endswith("shared_experts.gate_weight"):
        return (1, h)
    ffn = (arch.moe_ffn_hidden_size if is_expert(rule) else
           arch.moe_shared_expert_intermediate_size if ".shared_experts." in name else
           arch.ffn_hidden_size)
    if rule.fuse is Fuse.GLU:
        return (2 * ffn, h)
    if name.endswith("linear_proj.weight"):
        return (h, arch.num_attention_heads * d)
    if name.endswith("linear_fc2.weight"):
        return (h, ffn)
    return (h,)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def split_layer_name(name: str) -> tuple[int | None, str]:
    """'decoder.layers.3.mlp.linear_fc1.weight' -> (3, 'decoder.layers.{i}.mlp.linear_fc1.weight')"""
    m = _LAYER.match(name)
    return (int(m.group(1)), L_MC + m.group(2)) if m else (None, name)


def split_expert_name(pattern: str) -> tuple[int | None, str]:
    """'...mlp.experts.local_experts.2.linear_fc1.weight' -> (2, '...local_experts.{e}.linear_fc1
    .weight'): the rank-local expert index, and the rule's pattern."""
    m = _EXPERT.search(pattern)
    if not m:
        return None, pattern
    return int(m.group(1)), pattern[:m.start()] + ".local_experts.{e}." + pattern[m.end():]


def rule_by_megatron(arch: Arch) -> dict[str, Rule]:
    return {r.megatron: r for r in rules_for(arch)}
