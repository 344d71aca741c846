"""Generation throughput of an HF model with `transformers` generate: what a smaller model buys.

Prefill: one forward over the prompt batch (compute-bound). Decode: the rest of a greedy
`generate` of exactly `new_tokens` tokens (the KV cache, one token per step; memory-bound), i.e.
generate's time minus a prefill's, over (new_tokens - 1) x batch tokens. Median of `repeats`
runs after one warm-up, on random prompts of `prompt_tokens` tokens.
"""
from __future__ import annotations

import statistics
import time

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def generation_speed(model, vocab_size: int, prompt_tokens: int, new_tokens: int,
                     batch_sizes: list[int], repeats: int, seed: int = 0) -> dict:
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    out = {}
    for b in batch_sizes:
        ids = torch.randint(3, vocab_size, (b, prompt_tokens), generator=g).to(dev)
        mask = torch.ones_like(ids)
        prefill, total = [], []
        for r in range(repeats + 1):  # the first is a warm-up
            _sync()
            t0 = time.perf_counter()
            model(ids, attention_mask=mask, use_cache=True)
            _sync()
            t1 = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            _sync()
            t2 = time.perf_counter()
            if r:
                prefill.append(t1 - t0)
                total.append(t2 - t1)
        p, t = statistics.median(prefill), statistics.median(total)
        out[f"batch_{b}"] = {"prefill_tokens_per_s": b * prompt_tokens / p,
                             "decode_tokens_per_s": b * (new_tokens - 1) / max(t - p, 1e-9)}
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
            "device": str(dev), "dtype": str(next(model.parameters()).dtype).removeprefix(
                "torch."), **out}
