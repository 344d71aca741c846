"""Stage `convert`: a Hugging Face Llama folder -> a megatron-core distributed checkpoint.

    python -m recipes.convert --config conf/tiny.yaml run.dir=runs/x convert.hf_path=HF_DIR
    torchrun --nproc-per-node 2 -m recipes.convert --config ... parallel.tp=2

Streaming: the model is built on the meta device (structure only); megatron's checkpoint writer
asks for one chunk at a time and gets it from the safetensors shards right then (read without
mmap, fused, sliced for this rank). A process never holds more than one fused megatron tensor, so
an 8B converts on a machine with far less memory than the model. The checkpoint (torch_dist)
loads at any TP/PP later. Output: <run.dir>/convert/{iter_0000000/, latest_checkpointed_iteration.txt,
hf_config.json, tokenizer/, manifest.json}: also a Megatron-Bridge / Megatron-LM checkpoint
(recipes/lib/interop.py).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

from recipes.lib import (checkpoint, config, disk, hf_weights, interop, mapping, runtime, stage,
                         tokens)
from recipes.lib.arch import Arch, human, read_hf_config
from recipes.lib.layout import validate_layout
from recipes.lib.stage import StageDir, fingerprint, read_manifest
from recipes.lib.errors import Refusal

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
    """Record the sha256 of every input file in the manifest and compare them on a rerun (reads
    the files once per run); size and mtime are always compared."""

    def __post_init__(self):
        if self.dtype not in ("fp32", "bf16"):
            raise Refusal(f"convert.dtype={self.dtype!r}; use fp32 or bf16")


def run(cfg: config.Config) -> dict:
    c: ConvertConfig = cfg.convert
    tp, pp, ep = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep
    hf_path = Path(c.hf_path)
    out = Path(c.output or Path(cfg.run.dir) / "convert")
    # --- every check before any expensive work ---
    hf_cfg = read_hf_config(hf_path)
    arch = Arch.from_hf_config(hf_cfg, str(hf_path / "config.json"))
    tokens.check_tokenizer_files(hf_path, "convert.hf_path")  # copied into every export
    validate_layout(arch, tp, pp, ep)
    reader = hf_weights.HFReader(hf_path, mapping.hf_shapes(arch))
    # hash_weights only decides how inputs are checked: it leaves a finished stage finished
    sdir = StageDir("convert", out, fingerprint(c, {"tp": tp, "pp": pp}, ignore={"hash_weights"}),
                    cfg.run.force,
                    inputs={"hf_path": hf_weights.hf_files(hf_path)}, hash_files=c.hash_weights)
    if sdir.already_done():
        log.info("%s is complete (same config): skipping; pass run.force=true to redo", out)
        return read_manifest(out)

    with runtime.distributed(tp, pp, cfg.run.seed, ep):
        log.info("convert %s -> %s at TP=%d PP=%d, %s\n%s", hf_path, out, tp, pp, c.dtype,
                 config.to_yaml(cfg))
        tmp = sdir.begin(need=disk.nbytes(arch, c.dtype))
        checkpoint.save_from_hf(arch, reader, interop.iteration_dir(tmp, 0), c.dtype, "convert")
        if runtime.is_rank0():
            interop.write_layout(tmp, arch, 0, tp=tp, pp=pp, dtype=c.dtype,
                                 spec=runtime.resolve_spec("auto"))
            checkpoint.write_sidecars(tmp, hf_cfg, hf_path)
            (tmp / "config.yaml").write_text(config.to_yaml(cfg))
        peak_mb = runtime.peak_rss_mb()
        manifest = sdir.commit({
            "input": {"hf_path": str(hf_path.resolve())},
            "arch": arch.to_dict(), "num_params": arch.num_params(),
            "parallel": {"tp": tp, "pp": pp}, "dtype": c.dtype,
            "metrics": {"peak_rss_mb_rank0": round(peak_mb, 1)},
        })
        log.info("wrote %s (%s parameters, peak RSS %.0f MB on rank 0)", out,
                 human(arch.num_params()), peak_mb)
        return manifest


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "convert", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
