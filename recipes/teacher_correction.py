"""Stage `teacher_correction` (optional): fine-tune the teacher on the distillation data first.

    python -m recipes.teacher_correction --config conf/llama31_8b_to_4b_width.yaml

The paper corrects the teacher (~100B tokens) because the distillation data differ from the
teacher's pretraining data; NVIDIA's newer tutorials skip it. The same megatron-core loop as
`distill` (recipes/lib/train.py) with the model's own next-token cross-entropy and no teacher.
Point `prune.input` and `distill.teacher` at its output to use it. The same stage trains the
demo's baselines (make demo-compare): the pruned student with plain cross-entropy, and the same
architecture from random initialisation (`random_init=true`).
Output: <run.dir>/teacher_correction/{checkpoint/, logs/, manifest.json}.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch

from recipes.lib import checkpoint, config, runtime, train
from recipes.lib.stage import StageDir, fingerprint, read_manifest

log = logging.getLogger("recipes.teacher_correction")


@dataclasses.dataclass(kw_only=True)
class TeacherCorrectionConfig(train.TrainConfig):
    """The training settings of recipes/lib/train.py; `input` is the model to train."""

    random_init: bool = False
    """Start from megatron's random initialisation of `input`'s architecture (a baseline)."""


def make_step_fn(vocab_size: int):
    from recipes.lib.kd import lm_loss

    def make_step(training: bool):
        def step(data_iter, m):
            b = next(data_iter)
            dev = next(m.parameters()).device
            labels, mask = b["labels"].to(dev), b["loss_mask"].to(dev).float()
            logits = m(b["tokens"].to(dev), b["position_ids"].to(dev), attention_mask=None)

            def loss_func(output):
                n = mask.sum()
                total = (lm_loss(output, labels, vocab_size) * mask).sum()
                return total, n.int(), {"lm_loss": torch.stack([total.detach(), n])}

            return logits, loss_func

        return step

    return make_step


def run(cfg: config.Config) -> dict:
    c: TeacherCorrectionConfig = cfg.teacher_correction
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    train.check_precision(c)
    src, out = Path(c.input), Path(c.output or Path(cfg.run.dir) / "teacher_correction")
    arch = checkpoint.read_arch(src)
    from recipes.convert import validate

    validate(arch, tp, pp)
    train.check_data(c)
    train.check_layout(c, max(int(os.environ.get("WORLD_SIZE", 1)) // (tp * pp), 1))
    inputs = {"input": read_manifest(src)["fingerprint"],
              "data": [read_manifest(d)["fingerprint"] for d in c.data]}
    stage = StageDir("teacher_correction", out, fingerprint(c, {**inputs, "tp": tp, "pp": pp}),
                     cfg.run.force)
    if stage.already_done():
        log.info("%s is complete (same config): skipping", out)
        return read_manifest(out)
    resumable = {k: v for k, v in dataclasses.asdict(c).items() if k not in train.OPERATIONAL}
    with runtime.distributed(tp, pp, cfg.run.seed):
        work = stage.begin(resumable={**resumable, **inputs, "tp": tp, "pp": pp,
                                      "seed": cfg.run.seed})
        from recipes.lib import model as M

        dtype = "fp32" if c.precision == "fp32" else "bf16"
        extra = {"fp8": "hybrid", "fp8_recipe": "delayed"} if c.precision == "fp8" else {}
        model = M.build(arch, dtype=dtype, spec=c.spec, init=c.random_init, **extra)
        if not c.random_init:
            checkpoint.load(model, src / "checkpoint")
        final = train.train(c, work, model, make_step_fn(arch.vocab_size),
                            {"stage": "teacher_correction"}, cfg.run.seed)
        checkpoint.save(model, work / "checkpoint")

        def finish():
            import shutil

            checkpoint.copy_sidecars(src, work)
            if not c.keep_checkpoints:
                shutil.rmtree(work / "checkpoints")
            shutil.rmtree(work / "cache", ignore_errors=True)
            (work / "run.json").unlink()
            (work / "config.yaml").write_text(config.to_yaml(cfg))

        runtime.on_rank0(finish)
        return stage.commit({
            "input": {"path": str(src.resolve()), "data": [str(Path(d).resolve())
                                                           for d in c.data], **inputs},
            "arch": arch.to_dict(), "num_params": arch.num_params(), "dtype": dtype,
            "precision": c.precision, "parallel": {"tp": tp, "pp": pp}, "metrics": final})


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse_args(argv, "teacher_correction", __doc__)
    runtime.setup_logging(cfg.run.log_level)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
