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
class DistillConfig(train.TrainConfig):
    teacher: str
    """The teacher: a convert or teacher_correction stage folder, or a Megatron-Bridge /
    Megatron-LM checkpoint folder."""
    teacher_hf_config: str | None = None
    """Only for a Megatron-LM checkpoint as `teacher` (or one whose run_config.yaml should be
    overridden): the model's HF config.json, or an HF folder (its tokenizer is used too)."""
    kd_temperature: float = 1.0
    """Softmax temperature of the logit KL."""
    skip_lm_loss: bool = True
    """Train on the KD loss only (the paper); false adds the student's cross-entropy."""
    kd_loss_scale: float = 1.0
    """Weight of the KD loss against the LM loss when skip_lm_loss=false (ModelOpt balancer)."""
    intermediate_layer_pairs: list | None = None
    """[[student_module, teacher_module, cosine|mse], ...], e.g.
    [[decoder.final_layernorm, decoder.final_layernorm, cosine]]."""
    teacher_precision: str | None = None
    """Precision of the frozen teacher, whose logits are the target: default the student's,
    except that precision=fp8 keeps the teacher in bf16 unless teacher_precision=fp8."""

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_precision is None:
            self.teacher_precision = "bf16" if self.precision == "fp8" else self.precision
        if self.teacher_precision not in train.PRECISIONS:
            raise ValueError(f"teacher_precision={self.teacher_precision!r}; use one of "
                             f"{train.PRECISIONS}")
        if self.teacher_precision == "fp8" and self.spec == "local":
            raise ValueError("teacher_precision=fp8 needs the TE spec; use spec=auto (or te)")
        if self.kd_temperature <= 0 or self.kd_loss_scale <= 0:
            raise ValueError("kd_temperature and kd_loss_scale must be > 0")
        for pair in self.intermediate_layer_pairs or []:
            if len(pair) not in (2, 3) or (len(pair) == 3 and pair[2] not in ("cosine", "mse")):
                raise ValueError(f"intermediate_layer_pairs entry {pair}: use "
                                 "[student_module, teacher_module, cosine|mse]")


def run(cfg: config.Config) -> dict:
    c: DistillConfig = cfg.distill
    sources = train_stage.read_models("distill", ("input", "teacher"), cfg)
    student_arch, teacher_arch = sources["input"].arch, sources["teacher"].arch
    if student_arch.vocab_size != teacher_arch.vocab_size:
        raise ValueError(f"student vocab {student_arch.vocab_size} != teacher vocab "
                         f"{teacher_arch.vocab_size}: distillation needs one tokenizer")

    def build():
        return train_stage.build_distillation(c, (student_arch, sources["input"].weights),
                                              (teacher_arch, sources["teacher"].weights))

    return train_stage.run("distill", cfg, c, sources, build, {
        "teacher": {"arch": teacher_arch.to_dict(), "num_params": teacher_arch.num_params(),
                    "precision": c.teacher_precision}})


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "distill", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
