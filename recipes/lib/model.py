"""megatron-core GPTModel for a Llama `Arch`, and what stages do with it: name its parameters in
mapping terms, gather it back to HF tensors, and run a forward pass through the pipeline. Works
for any TP x PP the runtime initialised. (Filling it from HF is convert's streaming writer.)"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from recipes.lib import compat, mapping, runtime
from recipes.lib.arch import Arch, megatron_moe
from recipes.lib.errors import MissingKey, Refusal

compat.importable()  # megatron's import needs triton or its stand-in; apply() at use
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import LNImpl  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_block import (  # noqa: E402
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def layer_spec(kind: str = "auto", qk_norm: bool = False, num_experts: int | None = None):
    """The megatron layer spec `resolve_spec(kind)` names (with per-head Q/K norms: Qwen3; with
    `num_experts`, an MoE block of megatron's SequentialMLP experts: the expert layout ModelOpt's
    Minitron prunes, whose checkpoint keys grouped-GEMM experts share)."""
    if runtime.resolve_spec(kind) == "te":
        # lazy: imports Transformer Engine, which only a TE machine has
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_norm)
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                    normalization="RMSNorm", qk_layernorm=qk_norm)
    if num_experts:
        # megatron 0.19's local spec files the pre-MLP norm of an MoE layer under
        # mlp.linear_fc1.layer_norm_weight, a dense layer's TE name; the TE spec (and so
        # Megatron-LM / Bridge MoE checkpoints) keep it as pre_mlp_layernorm.weight: so do we
        keys = dict(spec.submodules.sharded_state_dict_keys_map)
        keys.pop("pre_mlp_layernorm.")
        spec.submodules.sharded_state_dict_keys_map = keys
    return spec


def moe_config(arch: Arch, aux_loss_coeff: float = 0.0) -> dict:
    """megatron's MoE settings for `arch` (none for a dense model): what the architecture is
    (arch.megatron_moe), the router in fp32, the load-balancing loss at `aux_loss_coeff` (0:
    none), and the expert-parallel layout. Tokens travel by all-gather on a CPU (the all-to-all
    dispatcher creates CUDA streams) and by all-to-all on a GPU."""
    if not arch.is_moe:
        return {}
    return dict(
        **megatron_moe(arch), moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall" if torch.cuda.is_available() else "allgather",
        moe_permute_fusion=False,
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff else "none",
        moe_aux_loss_coeff=aux_loss_coeff,
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size())


def fusions(spec: str) -> dict:
    """megatron's fused kernels the GPU runs with the TE spec: RoPE (TE's kernel), SwiGLU
    (megatron's fused function: its backward recomputes the activation from the input instead
    of keeping both) and the residual add (bias-dropout-add, with no bias and no dropout here).
    The unfused ops' numbers up to bf16 rounding (tests/gpu/test_gpu.py compares them). Off on
    a CPU and with the local spec: megatron's fuser is torch.compile, whose compile time there
    exceeds the demo's whole training. gradient_accumulation_fusion stays off: it needs apex."""
    if not torch.cuda.is_available() or runtime.resolve_spec(spec) != "te":
        return {}
    return {"apply_rope_fusion": True, "bias_activation_fusion": True,
            "bias_dropout_fusion": True}


def transformer_config(arch: Arch, dtype: str = "fp32", **overrides) -> TransformerConfig:
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    td = DTYPES[dtype]
    kw = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size, num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups, kv_channels=arch.head_dim,
        normalization="RMSNorm", layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=td, pipeline_dtype=td, bf16=dtype == "bf16", fp16=dtype == "fp16",
        **moe_config(arch),
    )
    kw.update(overrides)
    renormalised_top1 = kw.get("moe_router_topk") == 1 and not kw.get("moe_router_pre_softmax")
    if renormalised_top1:  # megatron's check refuses it (see below): set after construction
        kw["moe_router_pre_softmax"] = True
    cfg = TransformerConfig(**kw)
    if renormalised_top1:
        # Top-1 with renormalised weights (Mixtral's router at num_experts_per_tok=1) weights
        # the chosen expert by 1. megatron refuses the softmax over one logit, which gives the
        # router no gradient from the LM loss; so does the HF model it converts, whose router
        # then learns from the load-balancing loss alone. The router reads the field per call.
        cfg.moe_router_pre_softmax = False
    return cfg


def build(arch: Arch, dtype: str = "fp32", spec: str = "auto", init: bool = False,
          parallel_output: bool = True, meta: bool = False, **config_overrides) -> GPTModel:
    """This rank's pipeline stage of the model. `init=False` skips random init (about to load);
    `meta=True` builds structure only, on the meta device (no memory, CPU or GPU machine)."""
    pp = ps.get_pipeline_model_parallel_world_size()
    if arch.num_layers % pp:
        raise Refusal(f"num_layers={arch.num_layers} is not divisible by PP={pp}; "
                      "choose a pipeline size that divides the layer count")
    if meta:  # megatron passes an explicit CUDA device unless it initialises on the CPU
        config_overrides.update(use_cpu_initialization=True, init_model_with_meta_device=True)
        init = False
    cfg = transformer_config(arch, dtype, perform_initialization=init,
                             **{**fusions(spec), **config_overrides})
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = _gpt(arch, cfg, spec, parallel_output)
    if dtype != "fp32":  # as megatron's Float16Module: every parameter, the local spec's
        model.to(DTYPES[dtype])  # torch.nn.RMSNorm weights (created fp32) included
    if torch.cuda.is_available() and not meta:
        model.cuda()
    return model


def block_spec(arch: Arch, cfg: TransformerConfig, spec: str):
    """The decoder's spec: `layer_spec` for each layer and, with the local spec, megatron's
    local norm after the last one. Given a layer spec alone, megatron's TransformerBlock takes
    TE's norm for that final norm wherever Transformer Engine is installed, local layers or
    not: on a CPU with TE (the NVIDIA container without a GPU) the forward then fails
    ("CUDAGuardImpl initialized with non-CUDA DeviceType: cpu")."""
    layer = layer_spec(spec, arch.qk_norm, arch.num_moe_experts)
    if runtime.resolve_spec(spec) == "te":
        return layer
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(cfg), layer_norm=LNImpl))


def _gpt(arch: Arch, cfg: TransformerConfig, spec: str, parallel_output: bool) -> GPTModel:
    return GPTModel(
        config=cfg, transformer_layer_spec=block_spec(arch, cfg, spec),
        vocab_size=arch.padded_vocab_size, max_sequence_length=arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=arch.tie_embeddings, parallel_output=parallel_output,
        position_embedding_type="rope", rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )


def layer_offset(model: GPTModel) -> int:
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def expert_offset(arch: Arch) -> int:
    """Global index of this rank's first local expert (megatron gives each expert-parallel rank
    a contiguous block of num_moe_experts / EP)."""
    if not arch.is_moe:
        return 0
    return ps.get_expert_model_parallel_rank() * (
        arch.num_moe_experts // ps.get_expert_model_parallel_world_size())


def local_params(model: GPTModel, arch: Arch):
    """Yield (global megatron name, rule, param) for every parameter this rank holds."""
    rules = mapping.rule_by_megatron(arch)
    off, e_off = layer_offset(model), expert_offset(arch)
    for name, p in model.named_parameters():
        layer, pattern = mapping.split_layer_name(name)
        expert, pattern = mapping.split_expert_name(mapping.TE_PARAM_ALIASES.get(pattern, pattern))
        if pattern == "output_layer.weight" and arch.tie_embeddings:
            pattern = "embedding.word_embeddings.weight"  # tied copy on the last PP stage
        if pattern not in rules:
            raise MissingKey(f"megatron parameter {name} has no rule in recipes/lib/mapping.py")
        gname = pattern.format(i=layer + off, e=None if expert is None else expert + e_off) \
            if layer is not None else pattern
        yield gname, rules[pattern], p


def _tp_of(rule: mapping.Rule):
    """(group, size, rank) of the tensor parallelism `rule`'s tensor is sharded over: the
    expert tensor-parallel group for an expert's weights, the TP group for the rest."""
    if mapping.is_expert(rule):
        return (ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_world_size(),
                ps.get_expert_tensor_parallel_rank())
    return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank())


def _sends(rule: mapping.Rule) -> bool:
    """This rank is the one copy of its shard of `rule`'s tensor that travels to rank 0: TP
    rank 0 of its data-parallel rank 0 (for an expert's weights: expert TP rank 0 of expert
    data-parallel rank 0, each expert-parallel rank holding other experts)."""
    if mapping.is_expert(rule):
        return (ps.get_expert_tensor_parallel_rank() == 0
                and ps.get_expert_data_parallel_rank() == 0)
    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0


@torch.no_grad()
def gather_hf(model: GPTModel, arch: Arch, dtype: torch.dtype | None = None) -> dict | None:
    """The full HF state dict on global rank 0 (None elsewhere), gathered over TP, EP and PP.
    Tensors travel one at a time (no rank ever holds more than its shard plus one tensor, rank 0
    excepted)."""
    out: dict[str, torch.Tensor] | None = {} if dist.get_rank() == 0 else None
    by_rule = {m: (rule, hs) for rule, m, hs in mapping.expand(arch)}
    sends = {}
    for gname, rule, p in local_params(model, arch):
        if gname in sends:  # the tied output copy on the last stage: already have the embedding
            continue
        t = p.detach()
        group, tp, _ = _tp_of(rule)
        if tp > 1 and rule.tp is not mapping.TP.REPLICATED:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = mapping.unshard(rule, parts)
        sends[gname] = t
    # pipeline and experts: one copy of every tensor travels to global rank 0
    sends = {g: t for g, t in sends.items() if _sends(by_rule[g][0])}
    names_per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(names_per_rank, sorted(sends))
    for src, names in enumerate(names_per_rank):
        for gname in names:
            if src == dist.get_rank():
                t = sends[gname]
                if src != 0:
                    dist.send(t.contiguous(), dst=0)
            elif dist.get_rank() == 0:
                rule, _ = by_rule[gname]
                t = torch.empty(mapping.global_shape(rule, arch), dtype=_param_dtype(model),
                                device=next(model.parameters()).device)  # NCCL: on the GPU
                dist.recv(t, src=src)
            else:
                continue
            if out is not None:
                rule, hs = by_rule[gname]
                for h, v in zip(hs, mapping.split(rule, t, arch)):
                    out[h] = v.to(dtype or v.dtype).cpu().clone()
    return out


def _param_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def forward_logits(model: GPTModel, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Logits [batch, seq, vocab] (fp32, padding cut) on global rank 0; None elsewhere. Runs
    megatron's own pipeline schedule, one micro-batch per row of `tokens`."""
    tokens = tokens.to(next(model.parameters()).device)
    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device).unsqueeze(0)
    rows = iter(range(b))

    def step(_data_iter, m):
        i = next(rows)
        out = m(tokens[i: i + 1], pos, attention_mask=None)

        def collect(output, non_loss_data=True):
            return output

        return out, collect

    model.eval()
    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=None, model=[model], num_microbatches=b,
            seq_length=s, micro_batch_size=1, forward_only=True, collect_non_loss_data=True)
    result = None
    if ps.is_pipeline_last_stage():
        logits = torch.cat([o.float() for o in outs], dim=0)
        if ps.get_tensor_model_parallel_world_size() > 1 and model.parallel_output:
            # lazy: only under TP
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
            logits = gather_from_tensor_model_parallel_region(logits)
        result = logits[..., :vocab_size].cpu()
    return last_stage_to_rank0(result)


def forward_loss(model: GPTModel, windows: torch.Tensor, vocab_size: int,
                 micro_batch_size: int = 1) -> tuple[float, int] | None:
    """Summed next-token cross-entropy (fp32, padded vocab cut, as transformers computes it) and
    the token count over `windows` [n, seq + 1], on global rank 0 (None elsewhere). Runs megatron's
    pipeline schedule; logits never leave the last stage."""
    dev = next(model.parameters()).device
    n, s = windows.shape[0], windows.shape[1] - 1
    if n % micro_batch_size:
        raise Refusal(f"{n} windows are not a multiple of micro_batch_size {micro_batch_size}")
    pos = torch.arange(s, device=dev).unsqueeze(0)
    starts = iter(range(0, n, micro_batch_size))
    tp = ps.get_tensor_model_parallel_world_size()

    def step(_data_iter, m):
        i = next(starts)
        w = windows[i: i + micro_batch_size].to(dev)
        out = m(w[:, :-1], pos, attention_mask=None)

        def loss(output, non_loss_data=True):
            if tp > 1 and m.parallel_output:
                # lazy: only under TP
                from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
                output = gather_from_tensor_model_parallel_region(output)
            logits = output[..., :vocab_size].float()
            return F.cross_entropy(logits.reshape(-1, vocab_size), w[:, 1:].reshape(-1),
                                   reduction="sum").detach()

        return out, loss

    model.eval()
    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=None, model=[model],
            num_microbatches=n // micro_batch_size, seq_length=s,
            micro_batch_size=micro_batch_size, forward_only=True, collect_non_loss_data=True)
    total = float(sum(o.item() for o in outs)) if ps.is_pipeline_last_stage() else None
    total = last_stage_to_rank0(total)
    return (total, n * s) if dist.get_rank() == 0 else None


def last_stage_to_rank0(value):
    """`value` as the last pipeline stage's TP-rank-0 / DP-rank-0 holds it, on global rank 0
    (None elsewhere). Collective: every rank calls it."""
    src = _last_stage_rank0()
    box = [value if dist.get_rank() == src else None]
    if src != 0:
        dist.broadcast_object_list(box, src=src)
    return box[0] if dist.get_rank() == 0 else None


def _last_stage_rank0() -> int:
    """Global rank of TP-rank-0, DP-rank-0 on the last pipeline stage."""
    return _last_stage_rank0_of(dist.get_world_size(), ps.get_tensor_model_parallel_world_size(),
                                ps.get_pipeline_model_parallel_world_size())


@functools.cache
def _last_stage_rank0_of(world: int, tp: int, pp: int) -> int:
    """Found once per layout (every rank asks at the same point), not on every step."""
    flags = [None] * world
    me = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
          and ps.get_data_parallel_rank() == 0)
    dist.all_gather_object(flags, me)
    return flags.index(True)
