"""Generation throughput of an HF model with `transformers` generate: what a smaller model buys.

Prefill: one forward over the prompt batch (compute-bound). Decode: the rest of a greedy
`generate` of exactly `new_tokens` tokens (the KV cache, one token per step; memory-bound), i.e.
generate's time minus a prefill's, over (new_tokens - 1) x batch tokens. Median of `repeats`
runs after one warm-up, on random prompts of `prompt_tokens` tokens; several models' runs
interleaved, so that they share the host's state.
"""
from __future__ import annotations

import statistics
import time

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def _timed(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, generate seconds) of one run."""
    _sync()
    t0 = time.perf_counter()
    model(ids, attention_mask=mask, use_cache=True)
    _sync()
    t1 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync()
    return t1 - t0, time.perf_counter() - t1


def generation_speeds(models: dict, vocab_size: int, prompt_tokens: int, new_tokens: int,
                      batch_sizes: list[int], repeats: int, seed: int = 0) -> dict:
    """{name: throughput} of several models on the same prompts, their runs interleaved (a warm-up
    of each, then a, b, a, b, ...): a host whose speed drifts (a shared VM, a GPU's clocks) then
    slows every model alike (docs/measured.md: what timing them one after the other gave)."""
    dev = next(next(iter(models.values())).parameters()).device
    g = torch.Generator().manual_seed(seed)
    times = {n: {} for n in models}  # name -> batch -> [(prefill_s, generate_s)]
    for b in batch_sizes:
        ids = torch.randint(3, vocab_size, (b, prompt_tokens), generator=g).to(dev)
        mask = torch.ones_like(ids)
        for r in range(repeats + 1):  # the first is a warm-up
            for name, model in models.items():
                t = _timed(model, ids, mask, new_tokens)
                if r:
                    times[name].setdefault(b, []).append(t)
    return {name: _throughput(models[name], per_batch, prompt_tokens, new_tokens, repeats)
            for name, per_batch in times.items()}


def _throughput(model, per_batch: dict, prompt_tokens: int, new_tokens: int,
                repeats: int) -> dict:
    out = {}
    for b, runs in per_batch.items():
        p = statistics.median(x[0] for x in runs)
        t = statistics.median(x[1] for x in runs)
        out[f"batch_{b}"] = {"prefill_tokens_per_s": b * prompt_tokens / p,
                             "decode_tokens_per_s": b * (new_tokens - 1) / max(t - p, 1e-9)}
    param = next(model.parameters())
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
            "device": str(param.device), "dtype": str(param.dtype).removeprefix("torch."), **out}
