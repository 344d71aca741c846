"""Tiny random Llama checkpoints for tests (written with transformers, never downloaded)."""
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
}


def write_tiny_llama(path: Path, variant: str = "gqa", seed: int = 0, shards: int = 2,
                     **overrides) -> Path:
    """A random LlamaForCausalLM saved as sharded safetensors + a byte-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**VARIANTS[variant], "max_position_embeddings": 16384,
                         "bos_token_id": 1, "eos_token_id": 2, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms so a norm mapping error shows in the logits
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=max(size // shards + 1, 1000))
    _write_tokenizer(path, cfg.vocab_size)
    return Path(path)


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(3)} | {chr(33 + i): 3 + i for i in range(90)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<1>", eos_token="<2>",
                                   unk_token="<0>")
    fast.save_pretrained(path)
