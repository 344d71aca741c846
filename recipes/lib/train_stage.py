"""What the two training stages (`distill`, `teacher_correction`) share around the loop of
recipes/lib/train.py: the checks that need no model, the stage folder and its resume marker, the
precision-dependent build arguments, the final checkpoint and the order in which a finished run
is committed. A stage supplies only its models and its loss.

Finishing, in an order where a kill at any moment leaves a state that resumes or is committed:
1. the final model checkpoint is written to `<work>/iter_<train_iters>` (atomically:
   checkpoint.save), with the common state Bridge and Megatron-LM read;
2. its run_config.yaml and the tracker (interop.write_layout), the sidecars and the resolved
   config are written beside it;
3. the folder is committed (manifest written last, renamed into place: stage.StageDir.commit);
4. only then is the training state removed from the committed folder (`cleanup`). A kill
   between 3 and 4 leaves it behind; the next run of the same command finds the stage finished
   and removes it then.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from recipes.lib import (checkpoint, config, disk, interop, megatron_data, runtime, tokens,
                         train)
from recipes.lib.arch import Arch, distill_flops_per_token, training_memory
from recipes.lib.layout import validate_layouts
from recipes.lib.interop import Source
from recipes.lib.preempt import Fault, StopOnSignal
from recipes.lib.stage import CHECKPOINT_STAGES, StageDir, fingerprint, read_manifest
from recipes.lib.train_config import OPERATIONAL, KDConfig, TrainConfig, resolve_precision
from recipes.lib.errors import BadState, Refusal

log = logging.getLogger(__name__)


# fp8 matmuls: Ada / Hopper (8.9) and newer; some recipes need more
FP8_MIN_CAPABILITY = {"tensorwise": ((8, 9), "Ada or Hopper"), "delayed": ((8, 9), "Ada or Hopper"),
                      "blockwise": ((9, 0), "Hopper"), "mxfp8": ((10, 0), "Blackwell")}


def check_precision(c: TrainConfig) -> None:
    """Before anything is loaded: the layer spec exists here (spec=te needs Transformer Engine),
    fp8 (the student's or a KD teacher's) needs Transformer Engine on a GPU that has fp8 and
    the TE layer spec (TrainConfig already refuses fp8 with spec=local)."""
    spec = runtime.resolve_spec(c.spec)  # spec=te without Transformer Engine: refused here
    if "fp8" not in (c.precision, getattr(c, "teacher_precision", None)):
        return
    if spec != "te":
        raise Refusal("precision=fp8 needs Transformer Engine on a CUDA GPU (the NVIDIA "
                      "container, docker/); use precision=bf16 here")
    if c.fp8_recipe in FP8_MIN_CAPABILITY:
        need, name = FP8_MIN_CAPABILITY[c.fp8_recipe]
        have = torch.cuda.get_device_capability()
        if have < need:
            fix = "fp8_recipe=tensorwise" if have >= FP8_MIN_CAPABILITY["tensorwise"][0] \
                else "precision=bf16"
            raise Refusal(f"fp8_recipe={c.fp8_recipe} needs a {name} GPU (compute capability "
                          f"{need[0]}.{need[1]}); this one is {have[0]}.{have[1]}: use {fix}")


def build_kwargs(c: TrainConfig, precision: str | None = None, arch: Arch | None = None) -> dict:
    """M.build() arguments for a frozen model in `precision` (a teacher), or for the model
    trained (None: the stage's precision, with its activation recompute, and for a mixture of
    experts `arch` the routers' load-balancing loss): fp8 = bf16 parameters + TE fp8 compute
    with the configured recipe."""
    computes = precision or c.precision
    kw = {"dtype": "fp32" if computes == "fp32" else "bf16", "spec": c.spec, "init": False}
    if computes == "fp8":
        kw.update(fp8_recipe_kwargs(c))
    if precision is None and c.recompute_layers:
        kw.update(recompute_granularity="full", recompute_method="block",
                  recompute_num_layers=c.recompute_layers)
    if precision is None and arch is not None and arch.is_moe and c.moe_aux_loss_coeff:
        kw.update(moe_router_load_balancing_type="aux_loss",
                  moe_aux_loss_coeff=c.moe_aux_loss_coeff)
    return kw


def fp8_recipe_kwargs(c: TrainConfig) -> dict:
    """megatron TransformerConfig fields of the fp8 recipe (recorded in the manifest as is)."""
    kw = {"fp8": "hybrid", "fp8_recipe": c.fp8_recipe,
          "fp8_amax_history_len": c.fp8_amax_history_len,
          "fp8_amax_compute_algo": c.fp8_amax_compute_algo}
    if c.fp8_bf16_edge_layers:
        kw.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=c.fp8_bf16_edge_layers,
                  num_layers_at_end_in_bf16=c.fp8_bf16_edge_layers)
    return kw


def build_loaded(c: TrainConfig, model: tuple[Arch, Path], precision: str | None = None):
    """The model (architecture, weights folder) built for `c` in `precision` (default the
    stage's, see build_kwargs) with its weights loaded; inside the process groups."""
    from recipes.lib import model as M  # lazy: megatron (see train.py's module doc)

    arch, weights = model
    m = M.build(arch, **build_kwargs(c, precision, arch))
    checkpoint.load(m, weights, arch.vocab_size)
    return m


def build_distillation(c: KDConfig, student: tuple[Arch, Path], teacher,
                       kd_vocab: int | None = None) -> tuple:
    """(model, make_step, schedule_kwargs) for train.train: the student (architecture, weights
    folder) as ModelOpt's DistillationModel around the frozen teacher ((architecture, weights
    folder), or a module already built: prune's tournament replays cached teacher logits);
    inside the process groups. `kd_vocab`: the columns the KD loss compares (default the
    student's vocabulary). distill's model, and each tournament candidate's."""
    from recipes.lib import kd  # lazy: megatron and ModelOpt

    s_arch = student[0]
    kd_vocab = kd_vocab or s_arch.vocab_size
    t = build_loaded(c, teacher, c.teacher_precision) if isinstance(teacher, tuple) else teacher
    s = build_loaded(c, student)
    model, kl = kd.distillation_model(s, t, c, kd_vocab)
    return (model, kd.make_step_fn(model, kl, s_arch.vocab_size, c.skip_lm_loss,
                                   bool(c.intermediate_layer_pairs), kd_vocab),
            kd.schedule_kwargs(c))


def check_data(c: TrainConfig, name: str, vocab_size: int) -> None:
    """Each data folder fits the model and holds a sequence per split; masked (chat) data bears
    the loss on at least c.min_loss_tokens of its train tokens (logged either way)."""
    for d in c.data:
        m = tokens.data_manifest(d, vocab_size, f"{name}.data")
        for split in ("train", "valid"):
            if m["tokens"][split] < c.seq_length + 1:
                raise Refusal(f"{d}: the {split} split has {m['tokens'][split]} tokens, fewer "
                              f"than one sequence of {c.seq_length + 1}; add data or lower "
                              "seq_length")
        if m.get("loss_mask"):
            frac, empty = tokens.loss_coverage(d, m, c.seq_length)
            log.info("%s: %.1f%% of the train split's tokens bear the loss; %.0f%% of its "
                     "%d-token windows have none (they contribute nothing)", d, 100 * frac,
                     100 * empty, c.seq_length)
            if frac < c.min_loss_tokens:
                raise Refusal(
                    f"{d}: only {frac:.2%} of the train split's tokens bear the loss (assistant "
                    f"turns), and {empty:.0%} of its {c.seq_length}-token windows none at all: "
                    f"most steps would learn nothing; raise {name}.seq_length, shorten the "
                    "prompts, drop such rows before the data stage, or lower "
                    f"{name}.min_loss_tokens={c.min_loss_tokens} (0: no check)")


def read_models(name: str, roles: tuple[str, ...], cfg: config.Config) -> dict[str, Source]:
    """{role: checkpoint} that training stage `name` reads (role = its config key, with
    `<role>_hf_config` beside it): our stage folders or Bridge / Megatron-LM checkpoints, each
    architecture checked against the parallel layout."""
    c = cfg[name]
    sources = {r: interop.open_source(getattr(c, r), f"{name}.{r}", CHECKPOINT_STAGES,
                                      getattr(c, f"{r}_hf_config")) for r in roles}
    validate_layouts([s.arch for s in sources.values()], cfg.parallel.tp, cfg.parallel.pp,
                     cfg.parallel.ep, name)
    for s in sources.values():
        s.arch.check_seq_length(c.seq_length, f"{name}.seq_length")
    return sources


def run(name: str, cfg: config.Config, c: TrainConfig, sources: dict[str, Source],
        build: Callable[[TrainConfig], tuple],
        manifest: Callable[[TrainConfig], dict]) -> dict:
    """The whole training stage: `sources` = {role: checkpoint} (read_models) with role "input"
    the model trained; `build(c)` (inside the process groups) returns (model, make_step,
    schedule_kwargs or None) for train.train; `manifest(c)` the stage's own manifest fields.
    Both get `c` with precision=auto made concrete (resolve_precision)."""
    tp, pp, ep = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep
    check_precision(c)
    src = sources["input"]
    tokenized = sources.get("teacher", src)  # the data speak the teacher's tokenizer (distill)
    c = dataclasses.replace(c, data=megatron_data.as_folders(  # Megatron prefixes, imported
        c.data, cfg.run.dir, tokenized.arch.vocab_size,
        tokenized.hf_config.get("eos_token_id"), f"{name}.data", cfg.run.force))
    check_data(c, name, tokenized.arch.vocab_size)
    dp = max(int(os.environ.get("WORLD_SIZE", 1)) // (tp * pp), 1)
    train.check_layout(c, dp)
    train.check_optimizer(c, dp)
    out = Path(c.output or Path(cfg.run.dir) / name)
    inputs = {**{r: s.input() for r, s in sources.items()},
              **{f"data.{i}": d for i, d in enumerate(c.data)}}
    extra = {"tp": tp, "pp": pp, **({"ep": ep} if ep > 1 else {}), "seed": cfg.run.seed}
    # operational fields (save cadence, signals, logging) leave a finished stage finished
    stage = StageDir(name, out, fingerprint(c, extra, ignore=OPERATIONAL), cfg.run.force,
                     inputs=inputs)
    if stage.already_done():
        runtime.on_rank0(lambda: cleanup(out, c.keep_checkpoints))
        log.info("%s is complete (same config): skipping", out)
        return read_manifest(out)
    resumable = {**{k: v for k, v in dataclasses.asdict(c).items()
                    if k not in OPERATIONAL}, **extra}
    c, auto = resolve_precision(c, cfg.run.dir)
    if auto:  # a resume on a machine that would choose otherwise is refused, not mixed
        resumable["precision_auto"] = c.precision
    resumable["optimizer"] = train.optimizer_kind(c)  # its checkpoints differ by kind
    # the signal handlers go in before anything loads: a scheduler may signal early
    with StopOnSignal(c.preempt_signals) as stop, \
            runtime.distributed(tp, pp, cfg.run.seed, ep):
        arch, dtype = src.arch, build_kwargs(c)["dtype"]  # the final model + keep_last + 1 saves
        work = stage.begin(resumable=resumable, need=disk.nbytes(arch, dtype) + (
            c.keep_last + 1) * disk.training_nbytes(arch, dtype))
        memory = memory_note(name, c, sources, tp, pp, dp)
        if memory["gpu_gib"] and memory["estimate_gib"] > memory["gpu_gib"]:
            log.warning("%s: expect to run out of GPU memory. %s", name, memory["text"])
        try:
            model, make_step, schedule = build(c)
            log.info("%s %s: %d steps x %d x %d tokens, %s\n%s", name, src.path, c.train_iters,
                     c.global_batch_size, c.seq_length, c.precision, config.to_yaml(cfg))
            teacher = sources["teacher"].arch if "teacher" in sources else None
            final = train.train(c, work, model, make_step, {"stage": name, "flops_per_token":
                                distill_flops_per_token(teacher, arch, c.seq_length)},
                                cfg.run.seed, stop, schedule)
        except torch.OutOfMemoryError as e:  # the checkpoints saved so far stay for a resume
            raise BadState(f"{name} ran out of GPU memory ({str(e).splitlines()[0]}). "
                           f"{memory['text']}") from e
        fault = Fault()
        # ModelOpt hides a KD teacher from the state dict here
        checkpoint.save(model, interop.iteration_dir(work, c.train_iters), c.train_iters)
        fault.at("kill_in_finish", 1)

        def sidecars():
            interop.write_layout(work, arch, c.train_iters, tp=tp, pp=pp,
                                 dtype=build_kwargs(c)["dtype"], spec=runtime.resolve_spec(c.spec))
            checkpoint.write_sidecars(work, src.hf_config, src.tokenizer)
            shutil.rmtree(work / "cache", ignore_errors=True)
            (work / "config.yaml").write_text(config.to_yaml(cfg))

        runtime.on_rank0(sidecars)
        fault.at("kill_in_finish", 2)
        done = stage.commit({
            "input": {**{("path" if r == "input" else r): str(s.path.resolve())
                         for r, s in sources.items()},
                      "data": [str(Path(d).resolve()) for d in c.data]},
            "arch": arch.to_dict(), "num_params": arch.num_params(),
            "dtype": build_kwargs(c)["dtype"], "precision": c.precision, "precision_auto": auto,
            "fp8": fp8_recipe_kwargs(c) if c.precision == "fp8" else None,
            "parallel": {"tp": tp, "pp": pp, "ep": ep}, **manifest(c), "metrics": final})
        fault.at("kill_in_finish", 3)
        runtime.on_rank0(lambda: cleanup(out, c.keep_checkpoints))
        return done


def memory_note(name: str, c: TrainConfig, sources: dict[str, Source], tp: int, pp: int,
                dp: int) -> dict:
    """The peak memory per GPU estimated for this run (arch.training_memory, what `plan`
    prints), the GPU's memory (None on a CPU) and a text naming both and the settings that
    lower the peak: for the warning before a run the estimate says cannot fit, and the error of
    one that ran out."""
    teacher = sources["teacher"].arch if "teacher" in sources else None
    est = training_memory(teacher, sources["input"].arch, c.seq_length * c.micro_batch_size, tp,
                          pp, dp, **c.memory_settings()) / 2**30
    gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30 \
        if torch.cuda.is_available() else None
    layers = sources["input"].arch.num_layers // pp
    fixes = [f"{name}.micro_batch_size=1" if c.micro_batch_size > 1 else None,
             f"{name}.recompute_layers={layers}" if c.recompute_layers < layers else None,
             None if c.precision_aware_optimizer else f"{name}.precision_aware_optimizer=true",
             "a larger parallel.pp or parallel.tp", f"a shorter {name}.seq_length"]
    text = (f"Estimated peak at tp={tp} pp={pp} dp={dp}, {c.micro_batch_size} x "
            f"{c.seq_length} tokens per micro-batch: {est:.1f} GiB per GPU"
            + (f", of the GPU's {gpu:.0f} GiB" if gpu else "") + "; lower it with "
            + ", ".join(f for f in fixes if f) + " (make plan lists the layouts that fit)")
    return {"estimate_gib": est, "gpu_gib": gpu, "text": text}


def cleanup(out: Path, keep_checkpoints: bool) -> None:
    """Remove a committed training stage's resume state (idempotent; see the module doc)."""
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / "run.json").unlink(missing_ok=True)
