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
import logging
import sys

from recipes.lib import config, stage, tokens, train_config, train_stage
from recipes.lib.errors import Refusal

log = logging.getLogger("recipes.distill")


@dataclasses.dataclass(kw_only=True)
class DistillConfig(train_config.KDConfig):
    """The training and KD settings (recipes/lib/train.py); `input` is the student."""
    teacher: str
    """The teacher, as `input` is read: a convert or teacher_correction stage folder, or a
    Megatron-Bridge / Megatron-LM checkpoint folder."""
    teacher_hf_config: str | None = None
    """Like `input_hf_config`, for the teacher."""


def shared_vocabulary(student, teacher, tp: int) -> int:
    """The logit columns KD compares (interop.Source of each): the vocabulary when both models
    have the same; when their padded vocabularies differ (Qwen2.5-7B 152,064 vs 1.5B 151,936),
    the tokenizer's entries both share (TP=1). Refused, naming the first differing token, when
    the tokenizers differ."""
    sv, tv = student.arch.vocab_size, teacher.arch.vocab_size
    if student.tokenizer is None or teacher.tokenizer is None:
        if sv != tv:
            raise Refusal(f"student vocab {sv} != teacher vocab {tv}, and without both "
                          "tokenizers they cannot be compared: name each model's HF folder "
                          "(distill.input_hf_config / distill.teacher_hf_config)")
        return sv
    ids = [{i: t for t, i in tokens.load_tokenizer(x.tokenizer, k).get_vocab().items()}
           for x, k in ((student, "distill.input"), (teacher, "distill.teacher"))]
    for i in range(min(sv, tv)):
        if ids[0].get(i) != ids[1].get(i):
            raise Refusal(f"the student's and the teacher's tokenizers differ at id {i} "
                          f"(student {ids[0].get(i)!r}, teacher {ids[1].get(i)!r}): "
                          "distillation compares the same tokens' logits, so both need one "
                          "tokenizer; distil into a student of the teacher's family")
    if sv == tv:
        return sv
    if tp > 1:
        raise Refusal(f"student and teacher pad their vocabularies differently ({sv} vs "
                      f"{tv}): distil them at parallel.tp=1 (the logit shards would not "
                      "line up)")
    shared = min(sv, tv, max(i for i in ids[0] if i < min(sv, tv)) + 1)
    log.info("student vocab %d, teacher vocab %d, one tokenizer: KD over the %d shared entries",
             sv, tv, shared)
    return shared


def run(cfg: config.Config) -> dict:
    c: DistillConfig = cfg.distill
    sources = train_stage.read_models("distill", ("input", "teacher"), cfg)
    student_arch, teacher_arch = sources["input"].arch, sources["teacher"].arch
    kd_vocab = shared_vocabulary(sources["input"], sources["teacher"], cfg.parallel.tp)

    def build(c: DistillConfig):
        return train_stage.build_distillation(c, (student_arch, sources["input"].weights),
                                              (teacher_arch, sources["teacher"].weights),
                                              kd_vocab)

    return train_stage.run("distill", cfg, c, sources, build, lambda c: {
        "teacher": {"arch": teacher_arch.to_dict(), "num_params": teacher_arch.num_params(),
                    "precision": c.teacher_precision}, "kd_vocab": kd_vocab})


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "distill", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
