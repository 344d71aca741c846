"""The training loop shared by `distill` and `teacher_correction` (and prune's tournament),
assembled from megatron-core: GPTDataset (BlendedMegatronDatasetBuilder, weighted blends),
DistributedDataParallel, get_megatron_optimizer, OptimizerParamScheduler (warm-up + cosine to
min_lr) and the pipeline schedules of get_forward_backward_func. A stage supplies the model and a
`loss_func` factory; checkpoints and resume are recipes/lib/resume.py, signals and injected
faults recipes/lib/preempt.py, metrics.jsonl and TensorBoard recipes/lib/metrics.py.

Data order: global step s consumes dataset samples [s*G, (s+1)*G) (G = global batch), split over
data-parallel ranks in micro-batches, so the order depends only on (seed, step, G).
A restart with the same command resumes from the newest complete checkpoint (resume.py). On
SIGUSR1 / SIGTERM every rank finishes its step, saves it and raises `Preempted` (preempt.py).

megatron is imported inside the functions that use it (marked `# lazy`): every stage's config
check imports this module for TrainConfig, and megatron costs seconds to import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from recipes.lib import compat, config, megatron_data, runtime
from recipes.lib.metrics import Metrics, peak_memory_mb, speed
from recipes.lib.preempt import Fault, Preempted, StopOnSignal

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16", "fp8")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
# changing these between restarts does not change the numbers a run produces
OPERATIONAL = {"save_interval", "keep_last", "log_interval", "eval_interval", "eval_iters",
               "fault", "keep_checkpoints", "output", "preempt_signals"}


@dataclasses.dataclass(kw_only=True)
class TrainConfig(config.ModelInput):
    """The training loop's settings; `input` is the model trained."""
    data: list
    """Data stage folders or Megatron dataset prefixes (<prefix>.bin/.idx, imported on first use
    into <run.dir>/data_import/); more than one is a blend; a Megatron-LM blend [0.7, /data/a,
    0.3, /data/b] gives its weights."""
    data_weights: list | None = None
    """Blend weights, one per data folder (default: equal)."""
    seq_length: int = 8192
    """Tokens per sequence (the paper: 8192)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 1152
    """Sequences per optimizer step, all ranks together (the paper: 1152)."""
    train_iters: int = 9960
    """Optimizer steps (the paper: ~9,960 = 94B tokens)."""
    lr: float = 1e-4
    """Peak learning rate (the paper: 1e-4)."""
    min_lr: float = 1e-5
    """Final learning rate of the cosine decay (the paper: 1e-5)."""
    warmup_iters: int = 40
    """Linear warm-up steps (the paper: 40)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    clip_grad: float = 1.0
    """Gradient-norm clipping (0: off)."""
    precision: str = "auto"
    """auto | fp32 | bf16 | fp8 (Transformer Engine, GPU only: bf16 parameters, fp8 matmuls).
    auto: bf16 on a GPU; on a CPU bf16 only where it is natively fast (runtime.auto_precision),
    else fp32; decided once per run directory, recorded in the manifest."""
    spec: str = "auto"
    """Layer spec: auto (TE when present) | local | te."""
    fp8_recipe: str = "tensorwise"
    """With precision=fp8: megatron's fp8 recipe, tensorwise (current scaling, Megatron-Bridge's
    default) | delayed | blockwise (Hopper and newer) | mxfp8 (Blackwell only). tensorwise
    stores no fp8 state in a checkpoint: TE 2.20 refuses to load the pickled extra state that
    delayed scaling writes, so an fp8 resume or an fp8 output loaded into TE fails with it."""
    fp8_amax_history_len: int = 1024
    """With fp8_recipe=delayed: amax history window (Megatron-LM / NeMo's 1024)."""
    fp8_amax_compute_algo: str = "max"
    """With fp8_recipe=delayed: max | most_recent over the history."""
    fp8_bf16_edge_layers: int = 0
    """With precision=fp8: run this many first and this many last transformer layers in bf16
    (megatron's first_last_layers_bf16); 0: every layer in fp8."""
    optimizer: str = "auto"
    """auto | standard | distributed: megatron's distributed optimizer (fp32 master weights and
    Adam states sharded over DP ranks; its checkpoints reshard across DP sizes) or the standard
    one. auto: distributed wherever NCCL runs (a GPU, at any DP), standard on a CPU, where gloo
    has no reduce-scatter (distributed runs there at DP=1 only, the same numbers)."""
    precision_aware_optimizer: bool = False
    """GPU with Transformer Engine, bf16 or fp8: megatron's precision-aware optimizer (TE's
    FusedAdam) keeps the fp32 master weights as the bf16 weights plus 16-bit remainders, 2
    bytes per parameter less (16 instead of 18 for the student); fp32 Adam moments as before.
    The bf16 weights are then the master's truncation instead of its rounding."""
    eval_interval: int = 100
    """Validate every this many steps (and at the end)."""
    eval_iters: int = 4
    """Global batches of the valid split per validation (the same ones every time)."""
    save_interval: int = 500
    """Checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    keep_checkpoints: bool = False
    """Keep the training checkpoints (optimizer state) after a successful run."""
    log_interval: int = 1
    """Steps between metrics.jsonl / TensorBoard rows."""
    preempt_signals: list = dataclasses.field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    """Signals on which training saves at the end of the current step and exits with code 75
    (empty: the default actions)."""
    fault: str | None = None
    """Fault injection for tests: 'kill_after:N' (SIGKILL after step N), 'kill_in_save:N', or
    'signal_after:N' (the last rank alone sends itself SIGUSR1 after step N)."""

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; use one of {PRECISIONS}")
        if self.spec not in runtime.SPECS:
            raise ValueError(f"spec={self.spec!r}; use one of {runtime.SPECS}")
        if self.precision == "fp8" and self.spec == "local":
            raise ValueError("precision=fp8 runs its matmuls in Transformer Engine, which the "
                             "local spec does not use; use spec=auto (or te) with fp8, or "
                             "precision=bf16 with spec=local")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"fp8_recipe={self.fp8_recipe!r}; use one of {FP8_RECIPES}")
        if self.fp8_amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"fp8_amax_compute_algo={self.fp8_amax_compute_algo!r}; use max "
                             "or most_recent")
        if self.fp8_bf16_edge_layers < 0:
            raise ValueError(f"fp8_bf16_edge_layers={self.fp8_bf16_edge_layers} must be >= 0")
        if self.optimizer not in ("auto", "standard", "distributed"):
            raise ValueError(f"optimizer={self.optimizer!r}; use auto, standard or distributed")
        if self.precision_aware_optimizer and self.precision == "fp32":
            raise ValueError("precision_aware_optimizer stores bf16 weights plus remainders: "
                             "use it with precision=bf16 or fp8, or set it false")
        if self.precision_aware_optimizer and self.optimizer == "standard":
            raise ValueError("precision_aware_optimizer runs in megatron's distributed "
                             "optimizer: set optimizer=auto (or distributed)")
        for k in ("seq_length", "micro_batch_size", "global_batch_size", "train_iters",
                  "eval_interval", "eval_iters", "save_interval", "keep_last", "log_interval",
                  "fp8_amax_history_len"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}={getattr(self, k)} must be >= 1")
        if not 0 <= self.warmup_iters < self.train_iters:
            raise ValueError(f"warmup_iters={self.warmup_iters} must be below "
                             f"train_iters={self.train_iters}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be between 0 and lr={self.lr}")
        if isinstance(self.data, str):
            self.data = [self.data]
        paths, weights = megatron_data.parse_blend(self.data)  # [w, path, w, path, ...]
        if weights is not None:
            if self.data_weights is not None:
                raise ValueError("data is a Megatron-LM blend [weight, path, ...] and "
                                 "data_weights is set too: give the weights once")
            self.data, self.data_weights = paths, weights
        bad = [x for x in self.preempt_signals if x in ("SIGKILL", "SIGSTOP")
               or not isinstance(getattr(signal, str(x), None), signal.Signals)]
        if bad:
            raise ValueError(f"preempt_signals: {bad} are not signals a process can catch; use "
                             "names like SIGUSR1, SIGTERM")
        Fault(self.fault)  # a malformed fault spec fails here, not at the step it names
        if self.data_weights is not None:
            if len(self.data_weights) != len(self.data):
                raise ValueError(f"data_weights has {len(self.data_weights)} entries for "
                                 f"{len(self.data)} data folders")
            bad = [w for w in self.data_weights if isinstance(w, bool)
                   or not isinstance(w, (int, float)) or not 0 < w < float("inf")]
            if bad:
                raise ValueError(f"data_weights={self.data_weights}: {bad} are not positive "
                                 "numbers; give one weight > 0 per data folder, e.g. [0.7, 0.3]")


@dataclasses.dataclass(kw_only=True)
class KDConfig(TrainConfig):
    """The training settings plus knowledge distillation's (recipes/lib/kd.py): what `distill`
    trains with, and each of prune's tournament candidates."""
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
    """Precision of the frozen teacher, whose logits are the target: default the student's
    (auto included), except that precision=fp8 keeps the teacher in bf16 unless
    teacher_precision=fp8."""

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_precision is None:
            self.teacher_precision = "bf16" if self.precision == "fp8" else self.precision
        if self.teacher_precision not in PRECISIONS:
            raise ValueError(f"teacher_precision={self.teacher_precision!r}; use one of "
                             f"{PRECISIONS}")
        if self.teacher_precision == "fp8" and self.spec == "local":
            raise ValueError("teacher_precision=fp8 needs the TE spec; use spec=auto (or te)")
        if self.kd_temperature <= 0 or self.kd_loss_scale <= 0:
            raise ValueError("kd_temperature and kd_loss_scale must be > 0")
        for pair in self.intermediate_layer_pairs or []:
            if len(pair) not in (2, 3) or (len(pair) == 3 and pair[2] not in ("cosine", "mse")):
                raise ValueError(f"intermediate_layer_pairs entry {pair}: use "
                                 "[student_module, teacher_module, cosine|mse]")


def resolve_precision(c: TrainConfig, run_dir: str | Path) -> tuple[TrainConfig, dict | None]:
    """`c` with `auto` precisions (the student's, a KD teacher's) made concrete for this machine
    (runtime.auto_precision: one choice per run directory), and that choice with its reason;
    None when nothing was auto."""
    auto = [k for k in ("precision", "teacher_precision") if getattr(c, k, None) == "auto"]
    if not auto:
        return c, None
    choice = runtime.auto_precision(run_dir)
    log.info("precision=auto: %s (%s)", choice["precision"], choice["why"])
    return dataclasses.replace(c, **dict.fromkeys(auto, choice["precision"])), choice


def check_layout(c: TrainConfig, dp: int) -> int:
    """Micro-batches per step; errors when the global batch does not split evenly."""
    if c.global_batch_size % (c.micro_batch_size * dp):
        raise ValueError(f"global_batch_size={c.global_batch_size} is not divisible by "
                         f"micro_batch_size*DP={c.micro_batch_size}*{dp}")
    return c.global_batch_size // (c.micro_batch_size * dp)


# ---- steps ---------------------------------------------------------------------------------
def on_device(batch: dict, module) -> dict:
    """A micro-batch's tensors on the module's device; loss_mask as float."""
    dev = next(module.parameters()).device
    out = {k: v.to(dev) for k, v in batch.items()}
    out["loss_mask"] = out["loss_mask"].float()
    return out


def forward_steps(loss_func: Callable) -> Callable:
    """`make_step(training)` -> megatron's forward_step_func: the model's forward on the batch's
    tokens (labels never passed: the stage computes its losses) and, as the schedule's loss
    function, `loss_func(labels, loss_mask, output)` -> (loss sum, token count, report), with
    labels and loss_mask [b, s] and the output logits [s, b, v] as the output layer computed
    them (compat.logits_as_computed: no transposed copy)."""
    def make_step(training: bool):
        def step(data_iter, m):
            b = on_device(next(data_iter), m)
            with compat.logits_as_computed():
                logits = m(b["tokens"], b["position_ids"], attention_mask=None)
            return logits, functools.partial(loss_func, b["labels"], b["loss_mask"])

        return step

    return make_step


# ---- optimizer ----------------------------------------------------------------------------
def optimizer_kind(c: TrainConfig) -> str:
    """standard | distributed | precision-aware (distributed, with TE's FusedAdam): `optimizer`
    with auto made concrete for this machine. A resume refuses another kind (train_stage.run):
    the optimizer state's checkpoint layout differs."""
    if c.precision_aware_optimizer:
        return "precision-aware"
    if c.optimizer == "auto":
        return "distributed" if torch.cuda.is_available() else "standard"
    return c.optimizer


def check_optimizer(c: TrainConfig, dp: int) -> None:
    """Before any work: the precision-aware optimizer needs TE's FusedAdam on a GPU; the
    distributed optimizer on a CPU needs DP=1 (gloo has no reduce-scatter)."""
    if c.precision_aware_optimizer and not runtime.have_te():
        raise ValueError("precision_aware_optimizer needs Transformer Engine's FusedAdam on a "
                         "CUDA GPU (the NVIDIA container); set it false on this machine")
    if optimizer_kind(c) == "distributed" and dp > 1 and not torch.cuda.is_available():
        raise ValueError(f"optimizer=distributed on a CPU runs at DP=1 only (gloo has no "
                         f"reduce-scatter), here DP={dp}: set optimizer=auto or standard")


def build_optimizer(model, c: TrainConfig):
    """DDP wrapper, megatron optimizer (optimizer_kind) and LR schedule."""
    # lazy: megatron (see the module doc)
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    kind = optimizer_kind(c)
    distributed = kind != "standard"
    cfg = model.config
    ddp = DDP(cfg, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=distributed), model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=c.lr, min_lr=c.min_lr, weight_decay=c.weight_decay,
        adam_beta1=0.9, adam_beta2=c.adam_beta2, clip_grad=c.clip_grad,
        bf16=c.precision in ("bf16", "fp8"), params_dtype=cfg.params_dtype,
        use_distributed_optimizer=distributed,
        use_precision_aware_optimizer=kind == "precision-aware"), [ddp])
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=c.lr, min_lr=c.min_lr, lr_warmup_steps=c.warmup_iters,
        lr_decay_steps=c.train_iters, lr_decay_style="cosine", start_wd=c.weight_decay,
        end_wd=c.weight_decay, wd_incr_steps=c.train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    cfg.no_sync_func = ddp.no_sync
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.grad_scale_func = opt.scale_loss
    return ddp, opt, sched


# ---- loss reports -------------------------------------------------------------------------
def reduce_report(reports: list[dict]) -> dict | None:
    """Sum {name: [sum, count]} over micro-batches and DP ranks; {name: mean} on global rank 0."""
    # lazy: megatron (see the module doc)
    from megatron.core import parallel_state as ps

    from recipes.lib.model import last_stage_to_rank0  # lazy: megatron

    totals = None
    if ps.is_pipeline_last_stage() and reports:
        keys = sorted(reports[0])
        t = torch.stack([torch.stack([r[k].float() for r in reports]).sum(0) for k in keys])
        dist.all_reduce(t, group=ps.get_data_parallel_group())  # on the GPU under NCCL
        totals = {k: (t[i, 0] / t[i, 1]).item() for i, k in enumerate(keys)}
    return last_stage_to_rank0(totals)


# ---- the loop -----------------------------------------------------------------------------
def train(c: TrainConfig, work: Path, model, make_step: Callable, meta: dict, seed: int,
          stop: StopOnSignal | None = None, schedule_kwargs: Callable | None = None) -> dict:
    """Train `model` (a megatron module, possibly a ModelOpt DistillationModel) for
    c.train_iters steps, resuming from `work`/checkpoints. `make_step(training)` returns the
    forward_step_func for megatron's schedule; `schedule_kwargs(ddp)` (optional) more arguments
    for it once the model is wrapped (distillation under PP: kd.schedule_kwargs). `meta` (stage,
    flops_per_token for the logged TFLOP/s) goes into each checkpoint; `stop`: the handlers the
    stage installed before loading (a signal then stops after step 1). Returns the final metrics."""
    from megatron.core import parallel_state as ps  # lazy: megatron (see the module doc)

    from recipes.lib import batches, resume  # lazy: they import megatron

    n_micro = check_layout(c, ps.get_data_parallel_world_size())
    ddp, opt, sched = build_optimizer(model, c)
    train_ds, valid_ds = batches.datasets(c, seed, work / "cache")
    ckpts = work / "checkpoints"
    step = resume.resume(ckpts, ddp, opt, sched, c.global_batch_size)
    metrics = Metrics(work / "logs", step)
    run_step = scheduled(c, ddp, make_step, schedule_kwargs)
    tokens_per_step, flops = c.global_batch_size * c.seq_length, meta.get("flops_per_token")
    fault = Fault(c.fault)

    def validate() -> dict:
        ddp.eval()
        with torch.no_grad():
            reports = []
            for i in range(c.eval_iters):
                reports += run_step(batches.micro_batches(valid_ds, i, c, n_micro), training=False)
        ddp.train()
        return {f"valid_{k}": v for k, v in (reduce_report(reports) or {}).items()}

    final = {}
    bar = tqdm(total=c.train_iters, initial=step, unit="step", disable=not runtime.is_rank0(),
               desc=meta.get("stage", "train"))
    signals = contextlib.nullcontext(stop) if stop else StopOnSignal(c.preempt_signals)
    with signals as stop, bar, contextlib.closing(metrics):
        if step == 0:
            metrics.log({"step": 0, "tokens": 0, **validate()})
        ddp.train()
        while step < c.train_iters:
            stop.check()  # the signals still reach the handler (what the build imported)
            step_batches = batches.micro_batches(train_ds, step, c, n_micro)
            t0 = time.time()
            reports, ok, grad_norm, lr = optimizer_step(ddp, opt, sched, run_step, step_batches)
            step += 1
            dt = time.time() - t0
            rep = reduce_report(reports)
            row = {"step": step, "tokens": step * tokens_per_step, **(rep or {}), "lr": lr,
                   "grad_norm": grad_norm, **speed(tokens_per_step, dt, flops),
                   "step_s": dt, "memory_mb": peak_memory_mb(), "skipped": not ok}
            if step % c.eval_interval == 0 or step == c.train_iters:
                row.update(validate())
            if step % c.log_interval == 0 or "valid_lm_loss" in row or step == c.train_iters:
                metrics.log(row)
            runtime.on_rank0(functools.partial(check_finite, row, ckpts))  # every rank stops
            final = row
            bar.update(1)
            if runtime.is_rank0() and rep:
                bar.set_postfix({k: f"{v:.4f}" for k, v in rep.items()}
                                | {"tok/s": f"{row['tokens_per_s']:.0f}"})
            fault.at("kill_after", step)
            fault.at("signal_after", step)
            stopping = stop.agreed() and step < c.train_iters
            if stopping or step % c.save_interval == 0 or step == c.train_iters:
                resume.save_checkpoint(ckpts, step, ddp, opt, sched,
                                       {"global_batch_size": c.global_batch_size, **meta},
                                       c.keep_last, fault)
            if stopping:
                raise Preempted(
                    f"{stop.received or 'a signal on another rank'}: saved step {step} of "
                    f"{c.train_iters} to {ckpts}; rerun the same command to resume")
    return final or metrics.last()


def check_finite(row: dict, ckpts: Path) -> None:
    """Stop at the first NaN / inf loss (on rank 0, where the losses are reduced): megatron would
    go on updating, or skipping, every step (Megatron-LM checks it too); checkpoints stay."""
    bad = {k: v for k, v in row.items() if k.endswith("loss") and not math.isfinite(v)}
    if bad:
        from recipes.lib import resume  # lazy: it imports megatron

        saved = [p.name for p in resume.complete_checkpoints(ckpts)]
        raise RuntimeError(
            f"step {row['step']}: {', '.join(f'{k} = {v}' for k, v in bad.items())}: the run "
            "diverged, or the teacher, the student or the data holds NaN / inf values; "
            + (f"its newest checkpoint is {saved[-1]}" if saved else "nothing was saved")
            + "; lower the learning rate (run.force=true starts over) or check the inputs")


def optimizer_step(ddp, opt, sched, run_step: Callable, step_batches: list[dict]):
    """One training step (forward and backward over the step's micro-batches, the optimizer,
    the schedule): (loss reports, whether the step was applied, gradient norm as a float or None
    (megatron's is a [1] GPU tensor where TE is installed), learning rate used)."""
    ddp.zero_grad_buffer()
    opt.zero_grad()
    lr = opt.param_groups[0]["lr"]  # the rate this step uses
    reports = run_step(step_batches, training=True)
    ok, grad_norm, _ = opt.step()
    sched.step(increment=1)
    grad_norm = grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm
    return reports, ok, grad_norm, lr


def scheduled(c: TrainConfig, ddp, make_step: Callable, schedule_kwargs: Callable | None):
    """`run_step(batches, training)`: one pass of megatron's pipeline schedule over a step's
    micro-batches (forward and backward, or forward only); returns the loss reports."""
    # lazy: megatron (see the module doc)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    extra = schedule_kwargs(ddp) if schedule_kwargs else {}

    def run_step(batches: list[dict], training: bool) -> list:
        return fb(forward_step_func=make_step(training), data_iterator=iter(batches),
                  model=[ddp], num_microbatches=len(batches), seq_length=c.seq_length,
                  micro_batch_size=c.micro_batch_size, forward_only=not training, **extra)

    return run_step
