"""The architecture of a checkpoint of a supported family (Llama, Mistral / Mistral-NeMo, Qwen2 /
Qwen2.5, Qwen3, and the mixtures of experts Qwen3-MoE, Mixtral and Qwen2-MoE): read from an HF
`config.json`, written into every manifest, and turned back into that family's HF config on
export. No stage restates it by hand. What a family adds is data (`FAMILIES`), not code paths.
What pruning may make of one is recipes/lib/targets.py."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from recipes.lib.errors import MissingInput, Refusal

# Megatron's llama3 RoPE scaling (rotary_pos_embedding.py `_apply_scaling`) hard-codes these; a
# checkpoint asking for other values would be converted silently wrong, so it is refused.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
# model_type -> what the family is: its HF class, whether Q, K, V carry a bias (megatron
# add_qkv_bias) and whether Q and K are RMS-normed per head (megatron qk_layernorm), and the
# HF config fields that say so. All are decoders with RMSNorm, SwiGLU and RoPE. A mixture of
# experts (`moe`) names the HF config fields of its MoE block: the expert count, the expert
# FFN width, whether the top-k router weights are renormalised (a field, or a constant), and
# the width of a shared expert every token also runs through, gated by a sigmoid (Qwen2-MoE).
FAMILIES = {
    "llama": {"architectures": "LlamaForCausalLM", "qkv_bias": False, "qk_norm": False},
    "mistral": {"architectures": "MistralForCausalLM", "qkv_bias": False, "qk_norm": False},
    "qwen2": {"architectures": "Qwen2ForCausalLM", "qkv_bias": True, "qk_norm": False},
    "qwen3": {"architectures": "Qwen3ForCausalLM", "qkv_bias": False, "qk_norm": True},
    "qwen2_moe": {"architectures": "Qwen2MoeForCausalLM", "qkv_bias": True, "qk_norm": False,
                  "moe": {"experts": ("num_experts",), "ffn": "moe_intermediate_size",
                          "norm_topk_prob": "norm_topk_prob",
                          "shared": "shared_expert_intermediate_size"}},
    "qwen3_moe": {"architectures": "Qwen3MoeForCausalLM", "qkv_bias": False, "qk_norm": True,
                  "moe": {"experts": ("num_experts", "num_local_experts"),
                          "ffn": "moe_intermediate_size", "norm_topk_prob": "norm_topk_prob"}},
    "mixtral": {"architectures": "MixtralForCausalLM", "qkv_bias": False, "qk_norm": False,
                "moe": {"experts": ("num_local_experts",), "ffn": "intermediate_size",
                        "norm_topk_prob": True}},
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
REQUIRED_HF_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size",
                    "num_attention_heads", "vocab_size")
VOCAB_DIVISOR = 128  # Megatron pads the vocab to a multiple of this, independent of TP


@dataclasses.dataclass(frozen=True, kw_only=True)
class Arch:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    rope_theta: float
    rope_scaling_factor: float | None  # llama3 rope scaling; None = plain RoPE
    norm_eps: float
    max_position_embeddings: int
    family: str = "llama"
    """A key of FAMILIES: the HF class and config fields an export writes."""
    qkv_bias: bool = False
    """Q, K and V projections carry a bias (Qwen2)."""
    qk_norm: bool = False
    """Q and K are RMS-normed per head before RoPE (Qwen3)."""
    sliding_window: int | None = None
    """Sliding-window attention span (Mistral v0.1); megatron's layers attend to everything, so
    stages refuse sequences longer than this (check_seq_length)."""
    num_moe_experts: int | None = None
    """Experts of every layer's MoE block (None: a dense model). The MoE fields carry
    megatron's and ModelOpt's names, as prune's keys do."""
    moe_ffn_hidden_size: int | None = None
    """Each expert's SwiGLU width (HF moe_intermediate_size; Mixtral's intermediate_size)."""
    moe_router_topk: int = 0
    """Experts each token is routed to (HF num_experts_per_tok)."""
    moe_norm_topk_prob: bool = True
    """The top-k routing weights are renormalised to sum to 1 (HF norm_topk_prob; Mixtral
    always): megatron's softmax over the top-k logits, else the softmax over all experts."""
    moe_shared_expert_intermediate_size: int | None = None
    """The shared expert's SwiGLU width (Qwen2-MoE; None: none), with its sigmoid gate."""

    def __post_init__(self):
        if self.num_attention_heads % self.num_query_groups:
            raise Refusal(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                          f"of num_query_groups={self.num_query_groups}")
        if self.is_moe and not (1 <= self.moe_router_topk <= self.num_moe_experts):
            raise Refusal(f"moe_router_topk={self.moe_router_topk} must be between 1 and "
                          f"num_moe_experts={self.num_moe_experts}")

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_DIVISOR) * VOCAB_DIVISOR

    @property
    def _qkv_width(self) -> int:
        return self.head_dim * (self.num_attention_heads + 2 * self.num_query_groups)

    @property
    def _attention_params(self) -> int:
        """Weights of one layer's attention matmuls: q, k, v; o."""
        return self.hidden_size * (self._qkv_width + self.num_attention_heads * self.head_dim)

    @property
    def _expert_params(self) -> int:
        """One expert's weights: gate, up, down."""
        return 3 * self.hidden_size * self.moe_ffn_hidden_size

    def _mlp_params(self, active: bool) -> int:
        """One layer's MLP weights: gate, up, down; with experts, the router and every expert's
        (`active`: the router and the top-k experts a token runs through), and a shared expert
        with its gate (always active)."""
        h = self.hidden_size
        if not self.is_moe:
            return 3 * h * self.ffn_hidden_size
        experts = self.moe_router_topk if active else self.num_moe_experts
        shared = self.moe_shared_expert_intermediate_size or 0
        return (self.num_moe_experts * h + experts * self._expert_params
                + 3 * h * shared + h * bool(shared))  # the shared expert and its gate

    @property
    def _layer_matmul_params(self) -> int:
        """Weights of one layer's matmuls a token runs through: q, k, v; o; gate, up, down (of
        the top-k experts, and the router, in a mixture of experts)."""
        return self._attention_params + self._mlp_params(active=True)

    def num_params(self, active: bool = False) -> int:
        """Closed-form parameter count of the HF model (unpadded vocab); `active`: those one
        token runs through (a mixture of experts' top-k experts; a dense model's all)."""
        h = self.hidden_size
        extra = self._qkv_width * self.qkv_bias + 2 * self.head_dim * self.qk_norm  # qkv bias,
        layer = self._attention_params + self._mlp_params(active) + extra + 2 * h  # q/k norms,
        # and the layer's two norms
        emb = self.vocab_size * h
        return self.num_layers * layer + emb * (1 if self.tie_embeddings else 2) + h

    def num_active_params(self) -> int:
        return self.num_params(active=True)

    def expert_params(self) -> int:
        """Weights of every layer's experts (0 for a dense model): what expert parallelism
        shares out."""
        return self.num_layers * self.num_moe_experts * self._expert_params if self.is_moe else 0

    def params_per_rank(self, mp: int, ep: int = 1) -> float:
        """Weights one rank holds at model-parallel size `mp` (TP x PP) and expert parallelism
        `ep` (an expert's weights are split over the same TP as the rest)."""
        return (self.num_params() - self.expert_params()) / mp + self.expert_params() / (mp * ep)

    def flops_per_token(self, seq: int) -> float:
        """Forward FLOPs per token at sequence length `seq`: 2 per weight of every matmul (the
        output layer's included, the embedding lookup's not) plus causal attention's QK^T and
        AV, 2 * 2 * (seq / 2) * heads * head_dim per layer (a token sees seq / 2 keys on
        average). Training is 3x this (forward and backward), a frozen teacher 1x."""
        attention = 2 * seq * self.num_attention_heads * self.head_dim
        return (self.num_layers * (2 * self._layer_matmul_params + attention)
                + 2 * self.vocab_size * self.hidden_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Arch":
        return cls(**d)

    # ---- HF config.json <-> Arch -------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "Arch":
        mt = cfg.get("model_type")
        if mt not in FAMILIES:
            raise Refusal(f"{source}: model_type={mt!r} is not supported; this recipe converts "
                          f"the families {', '.join(FAMILIES)} ("
                          f"{', '.join(f['architectures'] for f in FAMILIES.values())})")
        fam = FAMILIES[mt]
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise Refusal(f"{source}: {flag}=true is not supported: {mt} with biases on "
                              "every projection has no megatron layout here")
        if cfg.get("hidden_act", "silu") != "silu":
            raise Refusal(f"{source}: hidden_act={cfg['hidden_act']!r}; these families use "
                          "'silu'")
        window = cfg.get("sliding_window")
        if cfg.get("use_sliding_window") is False:  # Qwen2/3 carry a window they do not use
            window = None
        missing = [k for k in REQUIRED_HF_KEYS if cfg.get(k) is None]
        if missing:
            raise Refusal(f"{source} lacks {missing}: not a complete config of a Llama-family "
                          "model; re-download it or add the fields")
        heads = cfg["num_attention_heads"]
        # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rtype = rope.get("rope_type", rope.get("type", "default"))
        factor = None
        if rtype == "llama3":
            for k, want in MEGATRON_LLAMA3_ROPE.items():
                if float(rope.get(k, want)) != want:
                    raise Refusal(f"{source}: rope {k}={rope[k]} differs from the {want} that "
                                  "megatron-core's llama3 RoPE scaling hard-codes")
            factor = float(rope["factor"])
        elif rtype != "default":
            raise Refusal(f"{source}: rope_type={rtype!r} unsupported (use default or llama3)")
        return cls(
            num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads,
            num_query_groups=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"], tie_embeddings=bool(cfg.get("tie_word_embeddings")),
            rope_theta=float(theta), rope_scaling_factor=factor,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            family=mt, qkv_bias=fam["qkv_bias"], qk_norm=fam["qk_norm"],
            sliding_window=int(window) if window else None,
            **_moe_fields(cfg, fam.get("moe"), source),
        )

    @classmethod
    def from_hf_dir(cls, path: Path) -> "Arch":
        return cls.from_hf_config(read_hf_config(path), str(Path(path) / "config.json"))

    def to_hf_config(self, base: dict | None = None) -> dict:
        """An HF LlamaConfig dict with this architecture; `base` (the teacher's config) supplies
        token ids and other fields that architecture changes do not touch."""
        # auto_map points transformers at remote code: the export is plain, no code;
        # layer_types (Qwen) has one entry per teacher layer: transformers rebuilds it;
        # quantization_config describes the source's storage, the export writes dense weights
        cfg = {k: v for k, v in (base or {}).items()
               if k not in ("rope_scaling", "rope_theta", "rope_parameters", "_name_or_path",
                            "auto_map", "layer_types", "quantization_config")}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling_factor is not None:
            rope = {**rope, "rope_type": "llama3", "factor": self.rope_scaling_factor,
                    **MEGATRON_LLAMA3_ROPE}
        cfg.update(
            architectures=[FAMILIES[self.family]["architectures"]], model_type=self.family,
            num_hidden_layers=self.num_layers, hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            head_dim=self.head_dim,  # explicit always: width pruning makes hidden/heads != head_dim
            vocab_size=self.vocab_size, tie_word_embeddings=self.tie_embeddings,
            rms_norm_eps=self.norm_eps, max_position_embeddings=self.max_position_embeddings,
            hidden_act="silu",
            rope_theta=self.rope_theta,
            rope_scaling=None if self.rope_scaling_factor is None else
            {k: v for k, v in rope.items() if k != "rope_theta"},
        )
        if self.family == "mistral":  # Qwen2/3 keep the base's sliding_window + use_sliding_window
            cfg.update(sliding_window=self.sliding_window)
        if self.is_moe:
            moe = FAMILIES[self.family]["moe"]
            cfg.update({moe["experts"][0]: self.num_moe_experts,
                        moe["ffn"]: self.moe_ffn_hidden_size,
                        "num_experts_per_tok": self.moe_router_topk})
            for k in moe["experts"][1:]:
                cfg.pop(k, None)  # one name for the count: the family's own
            if isinstance(moe["norm_topk_prob"], str):
                cfg[moe["norm_topk_prob"]] = self.moe_norm_topk_prob
            if "shared" in moe:
                cfg[moe["shared"]] = self.moe_shared_expert_intermediate_size
        if self.family in ("llama", "qwen3", "qwen3_moe"):  # Qwen2's bias is implied by its class
            cfg.update(attention_bias=False)
        if self.family == "llama":
            cfg.update(mlp_bias=False)
        return cfg

    def check_seq_length(self, seq_length: int, key: str) -> None:
        """Refuse sequences whose attention a sliding window would have restricted."""
        if self.sliding_window is not None and seq_length > self.sliding_window:
            raise Refusal(
                f"{key}={seq_length} exceeds the model's sliding_window={self.sliding_window}: "
                "the teacher attends only to the last window tokens, megatron's layers here to "
                f"all of them, so results would change; use {key}<={self.sliding_window}")


def _moe_fields(cfg: dict, moe: dict | None, source: str) -> dict:
    """Arch's MoE fields from an HF config (none for a dense family); a layout megatron's MoE
    block cannot hold is refused here, naming the field."""
    if moe is None:
        return {}
    experts = next((cfg[k] for k in moe["experts"] if cfg.get(k) is not None), None)
    ffn, topk = cfg.get(moe["ffn"]), cfg.get("num_experts_per_tok")
    missing = [k for k, v in ((moe["experts"][0], experts), (moe["ffn"], ffn),
                              ("num_experts_per_tok", topk)) if v is None]
    if missing:
        raise Refusal(f"{source} lacks {missing}: not a complete config of a "
                      f"{cfg['model_type']} mixture of experts; re-download it or add the fields")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise Refusal(f"{source}: mlp_only_layers={cfg.get('mlp_only_layers')} / "
                      f"decoder_sparse_step={cfg.get('decoder_sparse_step')}: dense layers "
                      "between the MoE layers are not supported; every layer must be MoE "
                      "(mlp_only_layers=[] and decoder_sparse_step=1)")
    shared = cfg.get(moe["shared"]) if "shared" in moe else None
    if "shared" not in moe and cfg.get("shared_expert_intermediate_size"):
        raise Refusal(f"{source}: shared_expert_intermediate_size="
                      f"{cfg['shared_expert_intermediate_size']}: a {cfg['model_type']} has no "
                      "shared expert; the config belongs to another family")
    norm = moe["norm_topk_prob"]
    return {"num_moe_experts": int(experts), "moe_ffn_hidden_size": int(ffn),
            "moe_router_topk": int(topk),
            "moe_norm_topk_prob": bool(cfg.get(norm, False)) if isinstance(norm, str) else norm,
            "moe_shared_expert_intermediate_size": int(shared) if shared else None}


def distill_flops_per_token(teacher: Arch | None, student: Arch, seq: int) -> float:
    """Model FLOPs of distillation per token: the student trained (3x its forward) against
    the frozen teacher's forward (None: no teacher, as teacher correction). plan's GPU-hours,
    the GPU benchmark's MFU, a training stage's logged TFLOP/s."""
    return 3 * student.flops_per_token(seq) + (teacher.flops_per_token(seq) if teacher else 0)


def fp8_flops_per_token(t: Arch, s: Arch, precision: str, teacher_precision: str,
                        bf16_edge_layers: int = 0) -> float:
    """The part of distill_flops_per_token that runs in fp8: the matmuls of the transformer
    layers in fp8 (fp8_layers), 3x the student's and 1x the teacher's; the LM heads and the
    attention stay in bf16 (the GPU benchmark's fp8 share of a step)."""
    per_layer = 2 * s._layer_matmul_params, 2 * t._layer_matmul_params
    return (3 * per_layer[0] * fp8_layers(s, precision, bf16_edge_layers)
            + per_layer[1] * fp8_layers(t, teacher_precision, bf16_edge_layers))


def layer_activations(a: Arch, seq: int) -> float:
    """Bytes one layer stores for the backward at micro-batch 1, with fused (flash) attention:
    34*s*h (Korthikanti et al. 2022 without the s^2 term); in a mixture of experts the MLP's
    19*s*h of it scaled by the FFN width a token runs through (top-k x an expert's) over the
    4*h that count assumes."""
    if not a.is_moe:
        return 34 * seq * a.hidden_size
    mlp = 19 * seq * a.moe_router_topk * a.moe_ffn_hidden_size / 4
    return 15 * seq * a.hidden_size + mlp


def prune_memory(t: Arch, seq: int, pp: int) -> float:
    """Bytes per GPU of pruning's calibration: bf16 weights, forward only (one layer's
    activations at a time) and fp32 logits."""
    return 2 * t.num_params() / pp + layer_activations(t, seq) + 4 * seq * t.padded_vocab_size


def fp8_layers(a: Arch, precision: str, bf16_edge_layers: int = 0) -> int:
    """The transformer layers of `a` whose matmuls run in fp8 at `precision` (none but at fp8;
    megatron's first_last_layers_bf16 keeps `bf16_edge_layers` at each end in bf16)."""
    return max(a.num_layers - 2 * bf16_edge_layers, 0) if precision == "fp8" else 0


def fp8_memory(a: Arch, seq: int, layers: int, training: bool, recomputed: int = 0) -> float:
    """Bytes Transformer Engine's fp8 adds to `layers` layers of `a` (TE 2.20's Linear, read in
    its source): each weight's fp8 copy is cached between micro-batches, one byte per weight for
    the forward, and when training a second (the column-wise copy, for the input gradient); a
    training layer keeps its matmuls' inputs in fp8 for the weight gradient instead of bf16, one
    byte less per element (q, k, v and gate / up see the hidden state, o the attention output,
    down the SwiGLU output); docs/measured.md holds it against a GPU's measured peaks.
    `recomputed` of the layers keep no inputs at all (stored_activations)."""
    weights = a._layer_matmul_params * (2 if training else 1)
    inputs = seq * (2 * a.hidden_size + a.num_attention_heads * a.head_dim
                    + a.ffn_hidden_size) if training else 0
    return layers * weights - max(layers - recomputed, 0) * inputs


def stored_activations(a: Arch, seq: int, layers: int, recompute_layers: int = 0) -> float:
    """Peak bytes `layers` layers of `a` keep for the backward at micro-batch 1, the first
    `recompute_layers` of them recomputed (megatron's block method): those keep their bf16
    input alone; the peak is the end of the forward, or with every layer recomputed the
    backward's recompute of one layer (the later ones' activations are freed by then)."""
    r = min(recompute_layers, layers)
    return r * 2 * seq * a.hidden_size + max(layers - r, 1 if r else 0) * layer_activations(a, seq)


def training_memory(t: Arch | None, s: Arch, seq: int, tp: int, pp: int, dp: int,
                    precision_aware: bool = False, precision: str = "bf16",
                    teacher_precision: str = "bf16", bf16_edge_layers: int = 0,
                    recompute_layers: int = 0, ep: int = 1) -> float:
    """Bytes per GPU of training `s` against the frozen teacher `t` (None: no teacher, as
    teacher correction), `seq` tokens per micro-batch: megatron's distributed optimizer (bf16
    params + fp32 grads per model-parallel shard; fp32 master weights and Adam moments sharded
    over DP, or bf16 + 16-bit remainders with `precision_aware`), a bf16 teacher at the same
    TP/PP, activations (`stored_activations` of a stage's layers, `recompute_layers` of them
    recomputed) / TP, fp32 student (+ teacher) logits, and what fp8 adds where the student's
    `precision` or the teacher's is fp8 (`fp8_memory`). Expert weights are shared out over `ep`
    expert-parallel ranks (params_per_rank); their optimizer state over the expert
    data-parallel ranks, dp / ep of them, which is again 1 / (mp x dp) of the whole."""
    mp = tp * pp
    state = 10 if precision_aware else 12  # master weights (or remainders) + Adam moments
    teacher = 2 * t.params_per_rank(mp, ep) if t is not None else 0
    fp8 = fp8_memory(s, seq, fp8_layers(s, precision, bf16_edge_layers), True,
                     min(recompute_layers, s.num_layers // pp) * pp)
    if t is not None:
        fp8 += fp8_memory(t, seq, fp8_layers(t, teacher_precision, bf16_edge_layers), False)
    return (teacher + 6 * s.params_per_rank(mp, ep) + state * s.num_params() / (mp * dp)
            + stored_activations(s, seq, s.num_layers // pp, recompute_layers) / tp
            + (2 if t is not None else 1) * 4 * seq * s.padded_vocab_size / tp + fp8 / mp)


def human(n: float) -> str:
    """A parameter count for a log line: 276.2K, 71.03M, 8.03B."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}" if unit != "K" else f"{n / div:.1f}{unit}"
    return str(int(n))


def read_hf_config(path: Path) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise MissingInput(f"{f} not found: point the stage at a Hugging Face model folder "
                           "(config.json + *.safetensors + tokenizer files)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise Refusal(f"{f} is not valid JSON ({e}); re-download the checkpoint") from e


def megatron_moe(arch: Arch) -> dict:
    """megatron TransformerConfig fields that `arch`'s mixture of experts is ({} for a dense
    model): the HF routers' softmax, top-k, with `moe_norm_topk_prob` the softmax over the top-k
    logits (renormalising the top-k probabilities; without it, over all experts), SequentialMLP
    experts, and a shared expert with its sigmoid gate. model.py adds the run's settings;
    interop.py writes them for Megatron-Bridge; ModelOpt's counters read them (search.py)."""
    if not arch.is_moe:
        return {}
    shared = arch.moe_shared_expert_intermediate_size
    return dict(num_moe_experts=arch.num_moe_experts, moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
                moe_router_topk=arch.moe_router_topk, moe_router_score_function="softmax",
                moe_router_pre_softmax=not arch.moe_norm_topk_prob, moe_grouped_gemm=False,
                moe_shared_expert_intermediate_size=shared,
                moe_shared_expert_gate=shared is not None)


def shape_rows(moe: bool) -> tuple[str, ...]:
    """The rows of a teacher / student table (plan, the report): a mixture of experts shows its
    experts, top-k and expert FFN where a dense model shows its FFN."""
    ffn = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size") if moe else (
        "ffn_hidden_size",)
    return ("num_layers", "hidden_size", *ffn, "num_attention_heads", "num_query_groups",
            "head_dim", "vocab_size")
