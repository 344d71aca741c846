import pytest

from recipes.lib.arch import Arch
from tests.unit.test_mapping_8b import LLAMA31_8B


def test_hf_config_round_trip_keeps_head_dim():
    a = Arch.from_hf_config(LLAMA31_8B)
    width = Arch(**{**a.to_dict(), "hidden_size": 3072, "ffn_hidden_size": 9216})
    cfg = width.to_hf_config(LLAMA31_8B)
    assert cfg["head_dim"] == 128 and 3072 // cfg["num_attention_heads"] != 128
    assert Arch.from_hf_config(cfg) == width
    assert cfg["bos_token_id"] == 128000  # carried over from the teacher config


def test_paper_targets_parameter_counts():
    a = Arch.from_hf_config(LLAMA31_8B)
    width = Arch(**{**a.to_dict(), "hidden_size": 3072, "ffn_hidden_size": 9216})
    depth = Arch(**{**a.to_dict(), "num_layers": 16})
    assert round(width.num_params() / 1e9, 2) == 4.51
    assert round(depth.num_params() / 1e9, 2) == 4.54


def test_flops_per_token_match_torchs_count_of_a_transformers_forward():
    """Arch.flops_per_token against torch's FlopCounterMode over a transformers Llama forward
    (eager attention, which multiplies the full [s x s] scores: twice the causal count)."""
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    a = Arch.from_hf_config(LLAMA31_8B)
    a = Arch(**{**a.to_dict(), "num_layers": 2, "hidden_size": 96, "ffn_hidden_size": 160,
                "num_attention_heads": 6, "num_query_groups": 2, "head_dim": 32,
                "vocab_size": 300})
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **a.to_hf_config(LLAMA31_8B), attn_implementation="eager")).eval()
    b, s = 2, 40
    with torch.no_grad(), FlopCounterMode(display=False) as count:
        model(torch.randint(0, 300, (b, s)))
    full_attention = a.num_layers * 2 * s * a.num_attention_heads * a.head_dim
    assert count.get_total_flops() == b * s * (a.flops_per_token(s) + full_attention)


def test_transformers5_rope_parameters_form():
    cfg = {**LLAMA31_8B, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                                             "factor": 32.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192}}
    del cfg["rope_scaling"]
    a = Arch.from_hf_config(cfg)
    assert a.rope_scaling_factor == 32.0 and a.rope_theta == 5e5


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}},
     "low_freq_factor=2.0 differs"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn' unsupported"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Arch.from_hf_config({**LLAMA31_8B, **change})


def test_unsupported_families_are_named():
    import pytest

    with pytest.raises(ValueError, match="model_type='deepseek_v3' is not supported; this "
                                         "recipe converts the families llama, mistral, qwen2, "
                                         "qwen3, qwen2_moe, qwen3_moe, mixtral .*MixtralForCausalLM"):
        Arch.from_hf_config({"model_type": "deepseek_v3", "num_hidden_layers": 2})
    with pytest.raises(ValueError, match="attention_bias=true is not supported"):
        Arch.from_hf_config({"model_type": "qwen3", "attention_bias": True})


def test_a_sliding_window_that_would_change_results_is_refused():
    import pytest

    base = {"model_type": "mistral", "num_hidden_layers": 2, "hidden_size": 64,
            "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 100}
    a = Arch.from_hf_config({**base, "sliding_window": 4096})
    a.check_seq_length(4096, "distill.seq_length")  # within the window: identical results
    with pytest.raises(ValueError, match="distill.seq_length=8192 exceeds the model's "
                                         "sliding_window=4096"):
        a.check_seq_length(8192, "distill.seq_length")
    unused = Arch.from_hf_config({**base, "model_type": "qwen2", "sliding_window": 4096,
                                  "use_sliding_window": False})
    unused.check_seq_length(8192, "distill.seq_length")  # Qwen's unused window: fine
