"""Llama-3.1-8B shapes on the meta device: every HF tensor maps to exactly one megatron
parameter of the right shape, and both sides count 8.03B parameters."""
import collections

import pytest
import torch

from recipes.lib import mapping, runtime
from recipes.lib.arch import Arch

LLAMA31_8B = dict(  # Meta's config.json for Llama-3.1-8B
    model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=32,
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5, hidden_act="silu",
    max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=128000,
    eos_token_id=128001, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})


@pytest.fixture(scope="module")
def arch():
    return Arch.from_hf_config(LLAMA31_8B)


def test_closed_form_count(arch):
    assert arch.num_params() == 8_030_261_248
    assert arch.head_dim == 128 and arch.padded_vocab_size == 128256


def test_hf_to_megatron_on_meta(arch):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**LLAMA31_8B))
    hf_sd = hf.state_dict()
    assert sum(t.numel() for t in hf_sd.values()) == arch.num_params()
    # the shapes convert demands of the weights are transformers' own
    assert mapping.hf_shapes(arch) == {k: tuple(t.shape) for k, t in hf_sd.items()}

    with runtime.distributed(1, 1):
        from recipes.lib import model as M

        mc = M.build(arch, meta=True)
        mc_params = {g: p for g, _, p in M.local_params(mc, arch)}
        assert sum(p.numel() for p in mc_params.values()) == arch.num_params()

    used = collections.Counter()
    for rule, mname, hnames in mapping.expand(arch):
        fused = mapping.fuse(rule, [hf_sd[h] for h in hnames], arch)
        assert fused.shape == mc_params[mname].shape == mapping.global_shape(rule, arch), mname
        back = mapping.split(rule, fused, arch)
        assert [b.shape for b in back] == [hf_sd[h].shape for h in hnames]
        used.update(hnames)
    assert set(used) == set(hf_sd) and set(used.values()) == {1}  # each HF tensor exactly once
    assert {m for _, m, _ in mapping.expand(arch)} == set(mc_params)


def test_tp_shard_and_unshard_are_inverse(arch):
    g = torch.Generator().manual_seed(0)
    small = Arch(**{**arch.to_dict(), "hidden_size": 16, "ffn_hidden_size": 24, "head_dim": 4,
                    "num_attention_heads": 8, "num_query_groups": 4, "vocab_size": 300})
    for rule in mapping.rules_for(small):
        t = torch.randn(mapping.global_shape(rule, small), generator=g)
        for tp in (1, 2, 4):
            shards = [mapping.shard(rule, t, tp, r) for r in range(tp)]
            assert torch.equal(mapping.unshard(rule, shards), t), (rule.megatron, tp)


def test_qkv_fusion_layout():
    """Megatron's layout: per query group, [its q heads, k, v]."""
    a = Arch(num_layers=1, hidden_size=2, ffn_hidden_size=2, num_attention_heads=4,
             num_query_groups=2, head_dim=1, vocab_size=2, tie_embeddings=True, rope_theta=1e4,
             rope_scaling_factor=None, norm_eps=1e-5, max_position_embeddings=8)
    q = torch.tensor([[0.0, 0], [1, 1], [2, 2], [3, 3]])
    k = torch.tensor([[10.0, 10], [11, 11]])
    v = torch.tensor([[20.0, 20], [21, 21]])
    rule = mapping.rule_by_megatron(a)["decoder.layers.{i}.self_attention.linear_qkv.weight"]
    fused = mapping.fuse(rule, [q, k, v], a)
    assert fused[:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
