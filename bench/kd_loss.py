"""The KD + LM loss of one micro-batch, forward and backward, three ways on the same logits:
the vocabulary tiles (recipes/lib/kd_tiles.py: the Triton kernel on a GPU, its torch mirror
elsewhere), the chunked path (kd.token_losses) and the reference a user would write (fp32
log-softmaxes, F.kl_div and F.cross_entropy over the whole [tokens x vocab] logits, as
ModelOpt's LogitsKLLoss does at TP=1), each training the KL and computing the student's NLL
for the log, as distillation does by default. Prints JSON: milliseconds per call (median of
--iters after one untimed), the peak memory above the inputs on a GPU, and the ratios to the
reference.

    python bench/kd_loss.py                       # GPU: seq 8192 x Llama-3's 128,256, bf16
    python bench/kd_loss.py --tokens 2048 --vocab 49152 --dtype fp32   # CPU: the demo's shapes
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def reference(s, t, y, temperature):
    ls = torch.log_softmax(s.float() / temperature, -1)
    lt = torch.log_softmax(t.float() / temperature, -1)
    kl = torch.nn.functional.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    nll = torch.nn.functional.cross_entropy(s.float(), y, reduction="none")
    return kl, nll


def ways(vocab: int):
    from recipes.lib import kd, kd_tiles

    return {"reference": reference,
            "tiles": lambda s, t, y, T: kd_tiles.tiled_losses(s, t, y, vocab, T),
            "chunks": lambda s, t, y, T: kd.token_losses(s, t, y, vocab, T)}


def measure(fn, s, t, y, temperature, iters: int, cuda: bool) -> dict:
    times = []
    for i in range(iters + 1):
        x = s.detach().requires_grad_()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        kl, nll = fn(x, t, y, temperature)  # the NLL computed for the log, not trained
        kl.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    out = {"ms": round(1e3 * statistics.median(times), 2)}
    if cuda:
        out["peak_gb_above_inputs"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    s = (torch.randn(a.tokens, a.vocab, device=dev, generator=g) * 3).to(dtype)
    t = (torch.randn(a.tokens, a.vocab, device=dev, generator=g) * 3).to(dtype)
    y = torch.randint(0, a.vocab, (a.tokens,), device=dev, generator=g)
    from recipes.lib import kd_tiles, runtime

    with runtime.distributed(1, 1):
        res = {name: measure(fn, s, t, y, a.temperature, a.iters, cuda)
               for name, fn in ways(a.vocab).items()}
    ref = res["reference"]["ms"]
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu",
           "tiles_impl": "triton" if cuda and kd_tiles.triton_ready() else "torch mirror",
           "shape": [a.tokens, a.vocab], "dtype": a.dtype, "runs": res,
           "speedup_vs_reference": {k: round(ref / v["ms"], 2) for k, v in res.items()}}
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
