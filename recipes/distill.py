"""Stage `distill`: knowledge distillation of the pruned student from the frozen teacher.

    python -m recipes.distill --config conf/demo.yaml
    torchrun --nproc-per-node 8 -m recipes.distill --config ... parallel.tp=2 parallel.pp=2

megatron-core's training loop (recipes/lib/train.py) with ModelOpt's Megatron distillation: the
student becomes an `mtd.DistillationModel` holding the teacher (same TP/PP); the loss is forward
KL(teacher || student) on the logits with a temperature (the paper's setting: logits only, no
cross-entropy), optionally plus intermediate-layer losses (cosine / MSE) and the student's LM
loss (`skip_lm_loss=false`, weighted by ModelOpt's loss balancer). The student's LM loss is
computed and logged in any case. A restart with the same command resumes.
Output: <run.dir>/distill/{iter_<train_iters>/, latest_checkpointed_iteration.txt, logs/metrics.jsonl,
logs/tensorboard/, manifest.json}: also a Megatron-Bridge / Megatron-LM checkpoint.
"""
from __future__ import annotations

import dataclasses
import sys

from recipes.lib import config, stage, train, train_stage


@dataclasses.dataclass(kw_only=True)
class DistillConfig(train.KDConfig):
    """The training and KD settings (recipes/lib/train.py); `input` is the student."""
    teacher: str
    """The teacher, as `input` is read: a convert or teacher_correction stage folder, or a
    Megatron-Bridge / Megatron-LM checkpoint folder."""
    teacher_hf_config: str | None = None
    """Like `input_hf_config`, for the teacher."""


def run(cfg: config.Config) -> dict:
    c: DistillConfig = cfg.distill
    sources = train_stage.read_models("distill", ("input", "teacher"), cfg)
    student_arch, teacher_arch = sources["input"].arch, sources["teacher"].arch
    if student_arch.vocab_size != teacher_arch.vocab_size:
        raise ValueError(f"student vocab {student_arch.vocab_size} != teacher vocab "
                         f"{teacher_arch.vocab_size}: distillation needs one tokenizer")

    def build(c: DistillConfig):
        return train_stage.build_distillation(c, (student_arch, sources["input"].weights),
                                              (teacher_arch, sources["teacher"].weights))

    return train_stage.run("distill", cfg, c, sources, build, lambda c: {
        "teacher": {"arch": teacher_arch.to_dict(), "num_params": teacher_arch.num_params(),
                    "precision": c.teacher_precision}})


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "distill", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
