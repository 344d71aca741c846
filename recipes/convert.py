"""Stage `convert`: a Hugging Face Llama folder -> a megatron-core distributed checkpoint.

    python -m recipes.convert --config conf/tiny.yaml run.dir=runs/x convert.hf_path=HF_DIR
    torchrun --nproc-per-node 2 -m recipes.convert --config ... parallel.tp=2

Streaming: the model is built on the meta device (structure only); megatron's checkpoint writer
asks for one chunk at a time and gets it from the safetensors shards right then (read without
mmap, fused, sliced for this rank). A process never holds more than one fused megatron tensor, so
an 8B converts on a machine with far less memory than the model. The checkpoint (torch_dist)
loads at any TP/PP later. Output: <run.dir>/convert/{checkpoint/, hf_config.json, tokenizer/, manifest.json}.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from recipes.lib import checkpoint, config, mapping, runtime
from recipes.lib.arch import Arch, read_hf_config
from recipes.lib.stage import StageDir, fingerprint, read_manifest, sha256_file

log = logging.getLogger("recipes.convert")


@dataclasses.dataclass(kw_only=True)
class ConvertConfig:
    hf_path: str
    """Hugging Face model folder: config.json, *.safetensors (+ index), tokenizer files."""
    output: str | None = None
    """Output folder; default <run.dir>/convert."""
    dtype: str = "bf16"
    """Parameter dtype of the checkpoint: fp32 | bf16 (Llama ships bf16)."""
    hash_weights: bool = True
    """Record the sha256 of every safetensors shard in the manifest (reads the files once)."""

    def __post_init__(self):
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"convert.dtype={self.dtype!r}; use fp32 or bf16")


def validate(arch: Arch, tp: int, pp: int) -> None:
    """Parallel layout errors, before any weights are read."""
    for what, n in (("num_attention_heads", arch.num_attention_heads),
                    ("num_query_groups (KV heads)", arch.num_query_groups)):
        if n % tp:
            raise ValueError(f"parallel.tp={tp} does not divide {what}={n}; choose a TP that "
                             f"divides both heads ({arch.num_attention_heads}) and KV groups "
                             f"({arch.num_query_groups})")
    if arch.num_layers % pp:
        raise ValueError(f"parallel.pp={pp} does not divide num_layers={arch.num_layers}")


def materializer(meta_model, arch: Arch, reader: checkpoint.HFReader, dtype: torch.dtype,
                 bar: tqdm):
    """`materialize(sharded_key, global_offset, sizes)` for checkpoint.save_streaming: the chunk
    of a megatron tensor, computed from the HF tensors it is made of (mapping.py)."""
    rules = mapping.rule_by_megatron(arch)
    by_key = {}  # sharded key (layer-less for layers) -> (rule, has a leading layer axis)
    for name, sh in meta_model.sharded_state_dict().items():
        if name.endswith("._extra_state"):
            continue
        layer, pattern = mapping.split_layer_name(name)
        if pattern == "output_layer.weight" and arch.tie_embeddings:
            pattern = "embedding.word_embeddings.weight"
        by_key[sh.key] = (rules[pattern], layer is not None)
    hf_of = {m: hs for _, m, hs in mapping.expand(arch)}
    last = {"name": None, "tensor": None}  # gate and up halves of fc1 come in turn

    def materialize(key: str, offset: tuple, sizes: tuple) -> torch.Tensor:
        rule, layered = by_key[key]
        name = rule.megatron.format(i=offset[0]) if layered else rule.megatron
        rest = slice(1, None) if layered else slice(None)
        if last["name"] != name:
            last["tensor"] = None  # free before reading the next one
            last["tensor"] = mapping.fuse(rule, [reader.get(h) for h in hf_of[name]],
                                          arch).to(dtype)
            last["name"] = name
        chunk = last["tensor"][tuple(slice(o, o + n) for o, n in zip(offset[rest], sizes[rest]))]
        bar.update()
        return chunk.reshape(sizes).clone()

    return materialize


def run(cfg: config.Config) -> dict:
    c: ConvertConfig = cfg.convert
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    hf_path = Path(c.hf_path)
    out = Path(c.output or Path(cfg.run.dir) / "convert")
    # --- every check before any expensive work ---
    hf_cfg = read_hf_config(hf_path)
    arch = Arch.from_hf_config(hf_cfg, str(hf_path / "config.json"))
    validate(arch, tp, pp)
    reader = checkpoint.HFReader(hf_path, mapping.hf_names(arch))
    stage = StageDir("convert", out, fingerprint(c, {"hf_config": hf_cfg, "tp": tp, "pp": pp}),
                     cfg.run.force)
    if stage.already_done():
        log.info("%s is complete (same config): skipping; pass run.force=true to redo", out)
        return read_manifest(out)

    with runtime.distributed(tp, pp, cfg.run.seed):
        log.info("convert %s -> %s at TP=%d PP=%d, %s\n%s", hf_path, out, tp, pp, c.dtype,
                 config.to_yaml(cfg))
        tmp = stage.begin()
        from recipes.lib import model as M

        m = M.build(arch, dtype=c.dtype, spec="local", meta=True)
        bar = tqdm(desc="convert", unit="chunk", disable=not runtime.is_rank0())
        checkpoint.save_streaming(m, tmp / "checkpoint",
                                  materializer(m, arch, reader, M.DTYPES[c.dtype], bar))
        bar.close()
        if runtime.is_rank0():
            checkpoint.write_sidecars(tmp, hf_cfg, hf_path)
            (tmp / "config.yaml").write_text(config.to_yaml(cfg))
        sources = {p.name: sha256_file(p) for p in [hf_path / "config.json", *reader.files()]} \
            if c.hash_weights and runtime.is_rank0() else {}
        peak_mb = runtime.peak_rss_mb()
        manifest = stage.commit({
            "input": {"hf_path": str(hf_path.resolve()), "sha256": sources},
            "arch": arch.to_dict(), "num_params": arch.num_params(),
            "parallel": {"tp": tp, "pp": pp}, "dtype": c.dtype,
            "metrics": {"peak_rss_mb_rank0": round(peak_mb, 1)},
        })
        log.info("wrote %s (%.3fB parameters, peak RSS %.0f MB on rank 0)", out,
                 arch.num_params() / 1e9, peak_mb)
        return manifest


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse_args(argv, "convert", __doc__)
    runtime.setup_logging(cfg.run.log_level)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
