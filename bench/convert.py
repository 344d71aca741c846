"""Conversion time and peak memory, against loading the same model whole with transformers.

    .venv/bin/python bench/convert.py [--layers 22 --hidden 2048 --ffn 5632]   (~1.1B, bf16)

Writes a random Llama checkpoint (TinyLlama-1.1B shapes by default), then runs, each in a fresh
child process so that peak RSS (VmHWM) is its own: (a) `recipes.convert` at TP=1, and (b) the
reference, `AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)` with every weight read once
(transformers leaves safetensors mmapped: untouched pages would not count). Prints both and their
ratios. Both include ~0.45 GB of interpreter + torch (+ megatron for (a)).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REFERENCE = """
import sys, time, torch
from transformers import AutoModelForCausalLM
from recipes.lib.runtime import peak_rss_mb
t = time.time()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
with torch.no_grad():  # touch every weight: mmapped pages count once they are used
    s = sum(float(p.float().sum()) for p in m.parameters())
print(time.time() - t, peak_rss_mb())
"""


def write_model(path: Path, layers: int, hidden: int, ffn: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                      tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="1GB")
    (path / "tokenizer_config.json").write_text("{}")
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = write_model(tmp / "hf", a.layers, a.hidden, a.ffn)
        size_mb = sum(f.stat().st_size for f in (tmp / "hf").glob("*.safetensors")) / 2**20
        t = time.time()
        subprocess.run([sys.executable, "-m", "recipes.convert", "--config",
                        str(ROOT / "conf/tiny.yaml"), f"run.dir={tmp / 'run'}",
                        f"convert.hf_path={tmp / 'hf'}", "convert.dtype=bf16",
                        "run.log_level=WARNING"], cwd=ROOT, check=True)
        conv_s = time.time() - t
        conv_mb = json.loads((tmp / "run/convert/manifest.json").read_text()
                             )["metrics"]["peak_rss_mb_rank0"]
        out = subprocess.run([sys.executable, "-c", REFERENCE, str(tmp / "hf")], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout.split()
        ref_s, ref_mb = float(out[-2]), float(out[-1])
    print(json.dumps({"params": n, "weights_mb": round(size_mb),
                      "convert": {"wall_s": round(conv_s, 1), "peak_rss_mb": round(conv_mb)},
                      "transformers_load": {"wall_s": round(ref_s, 1),
                                            "peak_rss_mb": round(ref_mb)},
                      "ratio_time": round(conv_s / ref_s, 2),
                      "ratio_peak_rss": round(conv_mb / ref_mb, 2),
                      "peak_rss_over_weights": round(conv_mb / size_mb, 2)}, indent=2))


if __name__ == "__main__":
    main()
