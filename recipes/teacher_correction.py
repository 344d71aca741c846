"""Stage `teacher_correction` (optional): fine-tune the teacher on the distillation data first.

    python -m recipes.teacher_correction --config conf/llama31_8b_to_4b_width.yaml

The paper corrects the teacher (~100B tokens) because the distillation data differ from the
teacher's pretraining data; NVIDIA's newer tutorials skip it. The same megatron-core loop as
`distill` (recipes/lib/train.py) with the model's own next-token cross-entropy and no teacher.
Point `prune.input` and `distill.teacher` at its output to use it. The same stage trains the
demo's baselines (make demo-compare): the pruned student with plain cross-entropy, and the same
architecture from random initialisation (`random_init=true`).
Output: <run.dir>/teacher_correction/{iter_<train_iters>/, latest_checkpointed_iteration.txt, logs/,
manifest.json}: also a Megatron-Bridge / Megatron-LM checkpoint.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from recipes.lib import checkpoint, config, stage, train, train_config, train_stage


@dataclasses.dataclass(kw_only=True)
class TeacherCorrectionConfig(train_config.TrainConfig):
    """The training settings of recipes/lib/train.py; `input` is the model to train."""

    random_init: bool = False
    """Start from megatron's random initialisation of `input`'s architecture (a baseline)."""


def make_step_fn(vocab_size: int):
    from recipes.lib.kd import masked_lm_loss  # lazy: megatron; config checks import this module

    def loss_func(labels, mask, output):
        n = mask.sum()
        total = masked_lm_loss(output, labels, mask, vocab_size)
        return total, n.int(), {"lm_loss": torch.stack([total.detach(), n])}

    return train.forward_steps(loss_func)


def run(cfg: config.Config) -> dict:
    c: TeacherCorrectionConfig = cfg.teacher_correction
    sources = train_stage.read_models("teacher_correction", ("input",), cfg)
    src = sources["input"]

    def build(c: TeacherCorrectionConfig):
        from recipes.lib import model as M  # lazy: megatron; config checks import this module

        model = M.build(src.arch, **{**train_stage.build_kwargs(c, arch=src.arch),
                                     "init": c.random_init})
        if not c.random_init:
            checkpoint.load(model, src.weights, src.arch.vocab_size)
        return model, make_step_fn(src.arch.vocab_size), None

    return train_stage.run("teacher_correction", cfg, c, sources, build, lambda c: {})


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "teacher_correction", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
