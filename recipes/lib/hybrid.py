"""HybridModel, GPTModel's successor in megatron-core, ahead of the day GPTModel goes (no stage
builds one yet; docs/hybrid.md says what changes then and what stays).

A GPT decoder layer is one HybridModel attention layer ('*') followed by one MLP layer ('-', or
'E' for a mixture of experts), so an `Arch` of L layers is the pattern `*-` (`*E`) repeated L
times. `build` makes that HybridModel on the local layer spec, from the same layer submodules
GPTModel gets (model.layer_spec), split in two; `load` reads one of our torch_dist checkpoints
(GPT's layout, what every stage writes) into it through megatron-core's own GPT -> Hybrid
interop (dist_checkpointing/gpt_checkpoint_interop.py), which retargets the hybrid model's
sharded keys at the GPT checkpoint without rewriting it.

One piece of help, fenced here: megatron-core 0.19's HybridStack builds its final norm with
TENorm whatever the spec (hybrid_block.py), which raises where Transformer Engine is absent;
`build` gives it megatron's local norm there, as our GPT block spec does (model.block_spec).
Written for the megatron-core of upstream.WRITTEN_FOR (compat.apply() warns on another);
tests/stages/test_hybrid.py holds it to GPTModel's logits. megatron is imported at the top:
callers import this module after compat.apply() (runtime.distributed).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing import gpt_checkpoint_interop as gpt_interop
from megatron.core.models.hybrid import hybrid_block
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from recipes.lib import checkpoint, runtime
from recipes.lib import model as M
from recipes.lib.arch import Arch
from recipes.lib.errors import Refusal


def pattern(arch: Arch) -> str:
    """The hybrid layer pattern of a GPT model of `arch`."""
    return ("*E" if arch.is_moe else "*-") * arch.num_layers


def stack_spec(arch: Arch) -> ModuleSpec:
    """HybridStack's spec: GPTModel's local layer submodules, the attention half ('*': input
    norm, attention) and the MLP half ('-' / 'E': pre-MLP norm, MLP or experts)."""
    gpt = M.layer_spec("local", arch.qk_norm, arch.num_moe_experts).submodules

    def keys(prefix: str) -> dict:  # the checkpoint names of the half's norm (TE's fused ones)
        return {k: v for k, v in gpt.sharded_state_dict_keys_map.items() if k.startswith(prefix)}

    attention = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=gpt.input_layernorm, self_attention=gpt.self_attention,
        self_attn_bda=gpt.self_attn_bda, sharded_state_dict_keys_map=keys("input_layernorm.")))
    mlp = TransformerLayerSubmodules(pre_mlp_layernorm=gpt.pre_mlp_layernorm, mlp=gpt.mlp,
                                     mlp_bda=gpt.mlp_bda,
                                     sharded_state_dict_keys_map=keys("pre_mlp_layernorm."))
    half = (dict(moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=mlp))
            if arch.is_moe else dict(mlp_layer=ModuleSpec(module=MLPLayer, submodules=mlp)))
    return ModuleSpec(module=HybridStack,
                      submodules=HybridStackSubmodules(attention_layer=attention, **half))


@contextlib.contextmanager
def _local_final_norm():
    """HybridStack's TENorm final norm as megatron's local norm, where TE is absent."""
    if runtime.te_installed():
        yield
        return
    local = M.layer_spec("local").submodules.input_layernorm  # the local spec's RMSNorm class
    was = hybrid_block.TENorm
    hybrid_block.TENorm = local
    try:
        yield
    finally:
        hybrid_block.TENorm = was


def build(arch: Arch, dtype: str = "fp32") -> HybridModel:
    """This rank's HybridModel of `arch` (local spec, not initialised: about to load)."""
    if arch.rope_scaling_factor is not None:
        raise Refusal(f"rope_scaling_factor={arch.rope_scaling_factor}: megatron-core's "
                      "HybridModel takes no llama3 RoPE scaling (GPTModel's rope_scaling); "
                      "Llama-3.1-style checkpoints stay on GPTModel")
    cfg = M.transformer_config(arch, dtype, perform_initialization=False,
                               num_layers=2 * arch.num_layers)
    with _local_final_norm():
        model = HybridModel(
            config=cfg, hybrid_stack_spec=stack_spec(arch), vocab_size=arch.padded_vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            hybrid_layer_pattern=pattern(arch), pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=arch.tie_embeddings,
            position_embedding_type="rope", rotary_base=arch.rope_theta)
    if dtype != "fp32":
        model.to(M.DTYPES[dtype])
    return model


def load(model: HybridModel, arch: Arch, directory: Path) -> None:
    """Our GPT torch_dist checkpoint at `directory` (an iter_* folder) into `model`, through
    megatron-core's GPT -> Hybrid retargeting, with every check of checkpoint.load (a key on
    one side only is refused by name)."""
    maps = gpt_interop.gpt_compatible_layer_maps(pattern(arch))
    checkpoint.load(model, directory, arch.vocab_size, retarget=lambda sharded: (
        gpt_interop.retarget_sharded_state_dict_to_gpt_checkpoint(sharded, maps)))
