"""GPTModel's successor, ahead of the switch (recipes/lib/hybrid.py, docs/hybrid.md): our dense
and MoE torch_dist checkpoints load into a megatron-core HybridModel with the `*-` / `*E`
pattern through megatron-core's own GPT -> Hybrid interop and give the GPTModel's logits, and
ModelOpt's Minitron prunes that HybridModel to the GPTModel's channels, heads, neurons and
experts, on tiny models the tests write."""
import re

import pytest
import torch

from recipes import convert
from recipes.lib import checkpoint, runtime
from recipes.lib.arch import Arch
from recipes.lib.errors import Refusal
from tests.conftest import TINY
from tests.tiny_models import write_tiny_llama

FAMILIES = ("qwen3", "qwen3_moe", "mixtral")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{family: (arch, iteration folder)} of each tiny model converted (fp32)."""
    base, out = tmp_path_factory.mktemp("hybrid"), {}
    for family in FAMILIES:
        hf, run = write_tiny_llama(base / family / "hf", family), base / family / "run"
        assert convert.main(["--config", TINY, f"run.dir={run}", f"convert.hf_path={hf}"]) == 0
        out[family] = (Arch.from_hf_dir(hf), run / "convert" / "iter_0000000")
    return out


def gpt_name(name: str) -> str:
    """A HybridModel parameter's GPTModel name: hybrid layers 2i ('*') and 2i+1 ('-' / 'E') are
    GPT layer i's attention and MLP halves."""
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if m:
        return f"decoder.layers.{int(m.group(1)) // 2}.{m.group(2)}"
    return name.replace("decoder.final_norm.", "decoder.final_layernorm.")


def models(arch, folder):
    """(GPTModel, HybridModel), each with the checkpoint loaded."""
    from recipes.lib import hybrid
    from recipes.lib import model as M

    g = M.build(arch, init=False)
    checkpoint.load(g, folder, arch.vocab_size)
    h = hybrid.build(arch)
    hybrid.load(h, arch, folder)
    return g, h


TOKENS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_gpt_checkpoint_loads_into_a_hybrid_model_with_the_same_logits(converted, family):
    arch, folder = converted[family]
    with runtime.distributed(1, 1):
        from recipes.lib import hybrid
        from recipes.lib import model as M

        g, h = models(arch, folder)
        assert h.hybrid_layer_pattern == hybrid.pattern(arch) == \
            ("*E" if arch.is_moe else "*-") * 4
        assert {gpt_name(n) for n, _ in h.named_parameters()} == \
            {n for n, _ in g.named_parameters()}
        a, b = M.forward_logits(g, TOKENS, arch.vocab_size), \
            M.forward_logits(h, TOKENS, arch.vocab_size)
    assert a.abs().max() > 0.1 and torch.equal(a, b)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_minitron_prunes_the_hybrid_model_as_the_gpt_model(converted, family, tmp_path):
    """The same calibration, the same export config: every pruned weight equal."""
    arch, folder = converted[family]
    export = {"hidden_size": 48, "num_attention_heads": 2}
    export.update({"num_moe_experts": 5, "moe_ffn_hidden_size": 32} if arch.is_moe
                  else {"ffn_hidden_size": 64})
    calib = torch.randint(0, 1000, (8, 33), generator=torch.Generator().manual_seed(1))
    with runtime.distributed(1, 1):
        from recipes.lib import model as M
        from recipes.lib import modelopt_local

        modelopt_local.enable()
        # lazy: importable only after modelopt_local.enable()
        import modelopt.torch.prune as mtp
        from modelopt.torch.prune.plugins import mcore_minitron as MM

        mode = [("mcore_minitron", MM.get_mcore_minitron_config(
            hidden_size_divisor=1, ffn_hidden_size_divisor=1, num_moe_experts_divisor=1,
            num_layers_divisor=1))]
        pruned = []
        for i, m in enumerate(models(arch, folder)):
            m, _ = mtp.prune(m, mode=mode, constraints={"export_config": export},
                             dummy_input=None, config={
                                 "forward_loop": lambda m: M.forward_loss(m, calib,
                                                                          arch.vocab_size),
                                 "scores_path": f"{tmp_path / str(i)}/"})
            pruned.append({gpt_name(n) if i else n: p.detach().clone()
                           for n, p in m.named_parameters()})
    gpt, hyb = pruned
    assert gpt.keys() == hyb.keys()
    assert gpt["embedding.word_embeddings.weight"].shape[1] == 48
    for k in gpt:
        assert torch.equal(gpt[k], hyb[k]), k


def test_what_hybrid_model_cannot_hold_is_refused(converted, tmp_path):
    """megatron-core's HybridModel has no llama3 RoPE scaling: Llama-3.1 stays on GPTModel."""
    arch = Arch.from_hf_dir(write_tiny_llama(tmp_path / "gqa", "gqa"))
    assert arch.rope_scaling_factor == 8.0
    with runtime.distributed(1, 1):
        from recipes.lib import hybrid

        with pytest.raises(Refusal, match="takes no llama3 RoPE scaling"):
            hybrid.build(arch)


def test_moe_checkpoints_keep_the_pre_mlp_norm_under_the_te_name(converted):
    """A local-spec MoE checkpoint names each layer's pre-MLP norm as the TE spec, Megatron-LM
    and Bridge do (megatron's local spec files it under a dense layer's fused name)."""
    from megatron.core import dist_checkpointing

    for family in ("qwen3_moe", "mixtral"):
        keys = set(dist_checkpointing.load_tensors_metadata(str(converted[family][1])))
        assert "decoder.layers.pre_mlp_layernorm.weight" in keys
        assert not any("linear_fc1.layer_norm" in k for k in keys)
    keys = set(dist_checkpointing.load_tensors_metadata(str(converted["qwen3"][1])))
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys  # dense: TE's fused name
