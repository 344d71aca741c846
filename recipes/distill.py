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

import torch

from recipes.lib import checkpoint, config, stage, train, train_stage



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


def distillation_model(student, teacher, c: DistillConfig, vocab_size: int):
    """Wrap the student as ModelOpt's DistillationModel (teacher inside, frozen). Returns it and
    the logit criterion (None on pipeline stages without the output layer)."""
    import modelopt.torch.distill as mtd
    from modelopt.torch.distill.plugins import megatron as mkd

    from recipes.lib.kd import VocabLogitsKLLoss

    dcfg = mkd.setup_distillation_config(mkd.DistillationConfig(
        intermediate_layer_pairs=[tuple(p) for p in c.intermediate_layer_pairs or []],
        skip_lm_loss=c.skip_lm_loss, kd_loss_scale=c.kd_loss_scale,
        logit_kl_temperature=c.kd_temperature), student.config, teacher.config)
    kl = None
    if dcfg.criterion:  # last stage: the logit loss over the real vocabulary
        kl = VocabLogitsKLLoss(student.config, vocab_size, c.kd_temperature)
        dcfg.criterion[tuple(dcfg.logit_layers)] = kl
    model = mtd.convert(student, mode=[("kd_loss", {
        "teacher_model": teacher, "criterion": dcfg.criterion,
        "loss_balancer": dcfg.loss_balancer})])
    mkd.adjust_distillation_model_for_mcore(model, dcfg)
    return model, kl


def make_step_fn(model, kl, vocab_size: int, skip_lm_loss: bool, intermediate: bool):
    """forward_step_func maker for megatron's schedule (train.forward_steps). Labels are never
    passed to the model: the LM loss is computed here on a masked copy of the logits (see
    recipes/lib/kd.py), or, when only logged and the losses are fused, by the KL criterion `kl`
    in the same pass."""
    from recipes.lib.kd import fused, lm_loss, reduce_sum

    lm_from_kl = skip_lm_loss and fused()

    def loss_func(labels, mask, output):
        n = mask.sum()
        if lm_from_kl:
            kl.labels = labels
            student_loss = torch.zeros((), device=output.device)  # ignored: skip_lm_loss
        else:
            lm_sum = (lm_loss(output, labels, vocab_size) * mask).sum()
            student_loss = lm_sum if not skip_lm_loss else lm_sum.detach()
        losses = model.compute_kd_loss(student_loss=student_loss,
                                       loss_reduction_fn=reduce_sum(mask))
        if lm_from_kl:
            lm_sum = (kl.nll * mask).sum()
        total = losses["kd_loss"]
        report = {"loss": torch.stack([total.detach(), n]),
                  "kd_loss": torch.stack([losses["logits_loss"].detach(), n]),
                  "lm_loss": torch.stack([lm_sum.detach(), n])}
        if intermediate:
            report["intermediate_loss"] = torch.stack(
                [losses["intermediate_loss"].detach().float(), n])
        return total, n.int(), report

    return train.forward_steps(loss_func)


def run(cfg: config.Config) -> dict:
    c: DistillConfig = cfg.distill
    sources = train_stage.read_models("distill", ("input", "teacher"), cfg)
    student_arch, teacher_arch = sources["input"].arch, sources["teacher"].arch
    if student_arch.vocab_size != teacher_arch.vocab_size:
        raise ValueError(f"student vocab {student_arch.vocab_size} != teacher vocab "
                         f"{teacher_arch.vocab_size}: distillation needs one tokenizer")
    teacher_kw = train_stage.build_kwargs(c, c.teacher_precision)

    def build():
        from recipes.lib import model as M

        teacher = M.build(teacher_arch, **teacher_kw)
        checkpoint.load(teacher, sources["teacher"].weights, teacher_arch.vocab_size)
        student = M.build(student_arch, **train_stage.build_kwargs(c))
        checkpoint.load(student, sources["input"].weights, student_arch.vocab_size)
        model, kl = distillation_model(student, teacher, c, student_arch.vocab_size)
        return model, make_step_fn(model, kl, student_arch.vocab_size, c.skip_lm_loss,
                                   bool(c.intermediate_layer_pairs))

    return train_stage.run("distill", cfg, c, sources, build, {
        "teacher": {"arch": teacher_arch.to_dict(), "num_params": teacher_arch.num_params(),
                    "precision": c.teacher_precision}})


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "distill", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
