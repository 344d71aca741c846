"""Tiny random checkpoints of each family for tests (written with transformers, never
downloaded): awkward shapes on purpose (GQA, head_dim != hidden/heads, odd vocab)."""
from __future__ import annotations

from pathlib import Path

import torch

VARIANTS = {
    # GQA (2 KV groups), llama3 rope scaling, head_dim != hidden/heads, odd vocab, untied
    "gqa": dict(vocab_size=1001, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                tie_word_embeddings=False, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # tied embeddings, plain RoPE, MHA
    "tied": dict(vocab_size=512, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                 rope_theta=10000.0),
    # Mistral-NeMo-like: explicit head_dim != hidden/heads, large rope_theta, no sliding window
    "mistral": dict(model_type="mistral", vocab_size=1001, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=24, tie_word_embeddings=False, rope_theta=1000000.0,
                    sliding_window=None),
    # Qwen2/2.5-small-like: biases on Q, K, V, tied embeddings, GQA
    "qwen2": dict(model_type="qwen2", vocab_size=1001, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False),
    # Qwen3-like: per-head Q/K RMSNorm, explicit head_dim, no QKV bias, untied
    "qwen3": dict(model_type="qwen3", vocab_size=1001, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=24, tie_word_embeddings=False, rope_theta=1000000.0,
                  attention_bias=False, use_sliding_window=False),
    # Qwen3-30B-A3B-like mixture of experts: 6 experts (not a power of two), top-2,
    # renormalised top-k weights, expert width != the dense intermediate_size
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=1001, hidden_size=64,
                      intermediate_size=96, moe_intermediate_size=40, num_experts=6,
                      num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                      tie_word_embeddings=False, rope_theta=1000000.0, use_sliding_window=False,
                      mlp_only_layers=[], decoder_sparse_step=1),
    # Qwen2-MoE-like: 5 experts, top-2 without renormalisation, a gated shared expert, Q/K/V
    # biases, tied embeddings
    "qwen2_moe": dict(model_type="qwen2_moe", vocab_size=1001, hidden_size=64,
                      intermediate_size=96, moe_intermediate_size=40,
                      shared_expert_intermediate_size=56, num_experts=5, num_experts_per_tok=2,
                      norm_topk_prob=False, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0,
                      use_sliding_window=False, mlp_only_layers=[], decoder_sparse_step=1),
    # Mixtral-like: 3 experts, top-1, experts as wide as intermediate_size, tied embeddings
    "mixtral": dict(model_type="mixtral", vocab_size=1001, hidden_size=64, intermediate_size=48,
                    num_local_experts=3, num_experts_per_tok=1, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                    rope_theta=1000000.0, sliding_window=None),
}
FAMILY_VARIANTS = ("mistral", "qwen2", "qwen3")
MOE_VARIANTS = ("qwen3_moe", "mixtral", "qwen2_moe")


def write_tiny_llama(path: Path, variant: str = "gqa", seed: int = 0, shards: int = 2,
                     **overrides) -> Path:
    """A random model of the variant's family (Llama unless it names another) saved as sharded
    safetensors + a character-level tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**VARIANTS[variant], "max_position_embeddings": 16384, "bos_token_id": 1,
          "eos_token_id": 2, **overrides}
    cfg = AutoConfig.for_model(kw.pop("model_type", "llama"), **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # non-trivial norms and biases so a mapping error shows in the logits
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("gate.weight"):  # a router: decisive top-k, so a misrouted token
                p.normal_(0.0, 1.0)  # (a mapping error) shows in the logits
            elif n.endswith(".bias"):
                p.normal_(0.0, 0.5)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=max(size // shards + 1, 1000))
    _write_tokenizer(path, cfg.vocab_size)
    return Path(path)


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(3)} | {chr(33 + i): 3 + i for i in range(90)} \
        | {" ": 93, "\n": 94}  # whitespace too: text with spaces is no unknown token
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<1>", eos_token="<2>",
                                   unk_token="<0>")
    fast.save_pretrained(path)


def state(folder: Path) -> dict:
    """Every tensor of an HF folder's safetensors shards, by name."""
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd
