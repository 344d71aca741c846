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
import sys
from pathlib import Path

import torch

from recipes.lib import checkpoint, config, runtime, train
from recipes.lib.stage import read_manifest

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
            b = train.on_device(next(data_iter), m)
            labels, mask = b["labels"], b["loss_mask"]
            logits = m(b["tokens"], b["position_ids"], attention_mask=None)

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
    inputs = {"input": read_manifest(src)["fingerprint"],
              "data": [read_manifest(d)["fingerprint"] for d in c.data]}
    stage, resumable = train.training_stage("teacher_correction", c, out, inputs, cfg)
    if stage.already_done():
        log.info("%s is complete (same config): skipping", out)
        return read_manifest(out)
    with runtime.distributed(tp, pp, cfg.run.seed):
        work = stage.begin(resumable=resumable)
        from recipes.lib import model as M

        kw = train.build_kwargs(c)
        model = M.build(arch, **{**kw, "init": c.random_init})
        if not c.random_init:
            checkpoint.load(model, src / "checkpoint")
        final = train.train(c, work, model, make_step_fn(arch.vocab_size),
                            {"stage": "teacher_correction"}, cfg.run.seed)
        checkpoint.save(model, work / "checkpoint")

        runtime.on_rank0(lambda: train.finish_stage(c, work, src, config.to_yaml(cfg)))
        return stage.commit({
            "input": {"path": str(src.resolve()), "data": [str(Path(d).resolve())
                                                           for d in c.data], **inputs},
            "arch": arch.to_dict(), "num_params": arch.num_params(), "dtype": kw["dtype"],
            "precision": c.precision, "parallel": {"tp": tp, "pp": pp}, "metrics": final})


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse_args(argv, "teacher_correction", __doc__)
    runtime.setup_logging(cfg.run.log_level)
    return train.exit_code(run, cfg)


if __name__ == "__main__":
    sys.exit(main())
