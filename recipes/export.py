"""Stage `export`: any megatron checkpoint of ours (converted, pruned, distilled; any TP/PP)
-> a Hugging Face folder that `AutoModelForCausalLM.from_pretrained(dir)` loads as is.

    python -m recipes.export --config conf/tiny.yaml run.dir=runs/x export.input=runs/x/convert
    torchrun --nproc-per-node 2 -m recipes.export --config ... parallel.pp=2

The checkpoint is loaded at the configured TP/PP, gathered tensor by tensor to rank 0 and
written as sharded safetensors with an index, `config.json` (actual dims, explicit head_dim),
`generation_config.json` and the tokenizer. Then a logit-parity check: the megatron model and the
exported HF model (both fp32) on fixed token sequences; past `parity_atol` the stage fails and
nothing is published.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch

from recipes.lib import checkpoint, config, disk, integrity, interop, runtime, stage
from recipes.lib.layout import validate_layout
from recipes.lib.stage import CHECKPOINT_STAGES, StageDir, fingerprint, read_manifest
from recipes.lib.errors import BadState, Refusal

log = logging.getLogger("recipes.export")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass(kw_only=True)
class ExportConfig(config.ModelInput):
    """`input`: any checkpoint stage folder (convert, teacher_correction, prune, distill) or a
    Bridge / Megatron-LM checkpoint; `output` the HF folder (default <run.dir>/export)."""
    dtype: str = "bf16"
    """dtype of the written safetensors: fp32 | bf16."""
    shard_size_mb: int = 5000
    """Largest safetensors shard."""
    parity_atol: float = 1e-2
    """Max |logit difference| (fp32) between megatron and the exported HF model. fp32 noise of a
    deep model alone reaches 1e-3 (a 30-layer SmolLM2 student: transformers fp32 vs fp64 differ by
    1.6e-3); a mapping error moves logits by O(1). Tests use 1e-4 on tiny models."""
    parity_rtol: float = 1e-3
    """Added to parity_atol: this fraction of the largest |logit|. A pruned model before any
    training has logits up to ~30, and GEMM kernels that sum in another order for megatron's
    [s, b, h] and transformers' [b, s, h] layouts (MKL's AVX2 path) move them by ~4e-4 of that
    through 30 layers (0.012 on the demo's pruned student); a mapping error is O(1)."""
    parity_sequences: int = 2
    """Number of fixed random token sequences for the parity check (0 disables it)."""
    parity_seq_length: int = 32
    """Tokens per parity sequence."""
    spec: str = "local"
    """Layer spec of the megatron side of the parity check: local | auto | te. local by default:
    Transformer Engine runs fp32 matmuls as TF32 on a GPU, which moves a deep model's logits
    past an fp32 tolerance though the weights are exact; the checkpoint is the same for both."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise Refusal(f"export.dtype={self.dtype!r}; use one of {list(DTYPES)}")
        if self.shard_size_mb < 1:
            raise Refusal("export.shard_size_mb must be >= 1")


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM  # lazy: seconds; config checks import this

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits.float()


def run(cfg: config.Config) -> dict:
    c: ExportConfig = cfg.export
    tp, pp, ep = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep
    out = Path(c.output or Path(cfg.run.dir) / "export")
    source = interop.open_source(c.input, "export.input", CHECKPOINT_STAGES, c.input_hf_config)
    arch = source.arch
    validate_layout(arch, tp, pp, ep)
    runtime.resolve_spec(c.spec)
    sdir = StageDir("export", out, fingerprint(c, {"tp": tp, "pp": pp}), cfg.run.force,
                    inputs={"input": source.input()})
    if sdir.already_done():
        log.info("%s is complete (same config): skipping", out)
        return read_manifest(out)

    with runtime.distributed(tp, pp, cfg.run.seed, ep):
        tmp = sdir.begin(need=disk.nbytes(arch, c.dtype, padded=False))
        from recipes.lib import model as M  # lazy: megatron; config checks import this module

        m = M.build(arch, dtype="fp32", spec=c.spec, init=False)
        checkpoint.load(m, source.weights, arch.vocab_size)
        tensors = M.gather_hf(m, arch, dtype=DTYPES[c.dtype])
        g = torch.Generator().manual_seed(cfg.run.seed)
        tokens = torch.randint(0, arch.vocab_size, (c.parity_sequences, c.parity_seq_length),
                               generator=g)
        mc_logits = M.forward_logits(m, tokens, arch.vocab_size) if c.parity_sequences else None
        del m
        def publish() -> dict:
            n = sum(t.numel() for t in tensors.values())
            files = checkpoint.write_hf_model(
                tensors, tmp, arch, source.hf_config, source.tokenizer,
                str(DTYPES[c.dtype]).removeprefix("torch."), c.shard_size_mb << 20)
            metrics = {"num_params": n, "files": files}
            tensors.clear()
            (tmp / "config.yaml").write_text(config.to_yaml(cfg))
            if mc_logits is not None:
                diff = (hf_logits(tmp, tokens) - mc_logits).abs().max().item()
                top = mc_logits.abs().max().item()
                metrics["parity_max_abs_diff"], metrics["parity_max_abs_logit"] = diff, top
                bound = c.parity_atol + c.parity_rtol * top
                log.info("logit parity megatron vs exported HF: max |diff| = %.3g (bound %.3g)",
                         diff, bound)
                if not diff <= bound:
                    raise BadState(
                        f"export parity failed: max |logit diff| {diff:.4g} > {bound:.4g} "
                        f"(export.parity_atol={c.parity_atol} + export.parity_rtol="
                        f"{c.parity_rtol} x max |logit| {top:.4g}); the folder was not "
                        f"published (left in {tmp})")
            # every file's size and CRC32 (evaluate checks them); the manifest comes last
            metrics["integrity"] = integrity.record(tmp, collective=False)
            return metrics

        metrics = runtime.on_rank0(publish) or {}
        manifest = sdir.commit({"input": source.provenance(),
                                 "arch": arch.to_dict(), "num_params": arch.num_params(),
                                 "dtype": c.dtype, "parallel": {"tp": tp, "pp": pp},
                                 "integrity": metrics.pop("integrity", None),
                                 "metrics": metrics})
        return manifest


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "export", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
