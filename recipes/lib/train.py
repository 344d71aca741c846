"""The training loop shared by `distill` and `teacher_correction` (and prune's tournament),
assembled from megatron-core: GPTDataset (BlendedMegatronDatasetBuilder, weighted blends),
DistributedDataParallel, get_megatron_optimizer, OptimizerParamScheduler (warm-up + cosine to
min_lr) and the pipeline schedules of get_forward_backward_func. A stage supplies the model and a
`loss_func` factory; checkpoints and resume are recipes/lib/resume.py, signals and injected
faults recipes/lib/preempt.py, metrics.jsonl and TensorBoard recipes/lib/metrics.py, the
settings (TrainConfig) recipes/lib/train_config.py.

Data order: global step s consumes dataset samples [s*G, (s+1)*G) (G = global batch), split over
data-parallel ranks in micro-batches, so the order depends only on (seed, step, G).
A restart with the same command resumes from the newest complete checkpoint (resume.py). On
SIGUSR1 / SIGTERM every rank finishes its step, saves it and raises `Preempted` (preempt.py).

megatron is imported inside the functions that use it (marked `# lazy`): light callers (a
stage's checks, plan) import this module, and megatron costs seconds to import.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from recipes.lib import compat, runtime
from recipes.lib.metrics import Metrics, peak_memory_mb, speed
from recipes.lib.preempt import Fault, Preempted, StopOnSignal
from recipes.lib.train_config import TrainConfig
from recipes.lib.errors import BadState, Refusal

log = logging.getLogger(__name__)


def check_layout(c: TrainConfig, dp: int) -> int:
    """Micro-batches per step; errors when the global batch does not split evenly."""
    if c.global_batch_size % (c.micro_batch_size * dp):
        raise Refusal(f"global_batch_size={c.global_batch_size} is not divisible by "
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
        raise Refusal("precision_aware_optimizer needs Transformer Engine's FusedAdam on a "
                      "CUDA GPU (the NVIDIA container); set it false on this machine")
    if optimizer_kind(c) == "distributed" and dp > 1 and not torch.cuda.is_available():
        raise Refusal(f"optimizer=distributed on a CPU runs at DP=1 only (gloo has no "
                      f"reduce-scatter), here DP={dp}: set optimizer=auto or standard")


# megatron's default at DP <= 40, fixed here: its own grows with DP past 40, and the distributed
# optimizer's checkpoint (dp_reshardable) is laid out per bucket, resharding over DP only for the
# same buckets
GRAD_BUCKET_ELEMENTS = 40_000_000


def build_optimizer(model, c: TrainConfig):
    """DDP wrapper, megatron optimizer (optimizer_kind) and LR schedule."""
    # lazy: megatron (see the module doc)
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    kind = optimizer_kind(c)
    distributed = kind != "standard"
    cfg = model.config
    ddp = DDP(cfg, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=c.overlap_grad_reduce,
        bucket_size=GRAD_BUCKET_ELEMENTS if c.overlap_grad_reduce else None,
        use_distributed_optimizer=distributed), model)
    if c.overlap_grad_reduce:
        log.info("gradient reduction overlapped with the backward: %d bucket(s) over DP=%d",
                 sum(len(g.buckets) for g in ddp.bucket_groups),
                 ps.get_data_parallel_world_size())
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=c.lr, min_lr=c.min_lr, weight_decay=c.weight_decay,
        adam_beta1=0.9, adam_beta2=c.adam_beta2, clip_grad=c.clip_grad,
        bf16=c.precision in ("bf16", "fp8"), params_dtype=cfg.params_dtype,
        use_distributed_optimizer=distributed,
        use_precision_aware_optimizer=kind == "precision-aware"), [ddp])
    fused_cpu_adam(opt)
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=c.lr, min_lr=c.min_lr, lr_warmup_steps=c.warmup_iters,
        lr_decay_steps=c.train_iters, lr_decay_style="cosine", start_wd=c.weight_decay,
        end_wd=c.weight_decay, wd_incr_steps=c.train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    cfg.no_sync_func = ddp.no_sync
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.grad_scale_func = opt.scale_loss
    return ddp, opt, sched


def fused_cpu_adam(opt) -> None:
    """Switch the torch AdamW inside megatron's optimizer `opt` to torch's fused kernel where
    its parameters are fp32 on the CPU (megatron builds it without `fused`, and on a CPU torch
    then loops over the parameters one op at a time: 5x slower for the demo's 71M student,
    docs/measured.md); the same update up to fp32 rounding (tests/unit/test_compat.py). On a GPU
    nothing changes: megatron's TE FusedAdam, or torch's own choice."""
    for inner in getattr(opt, "chained_optimizers", [opt]):
        torch_opt = getattr(inner, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in torch_opt.param_groups:
            if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in group["params"]):
                group.update(fused=True, foreach=False)


# ---- loss reports -------------------------------------------------------------------------
def reduce_report(reports: list[dict]) -> dict | None:
    """Sum {name: [sum, count]} over micro-batches and DP ranks; {name: mean} on global rank 0.
    A micro-batch without a target token (a loss mask of zeros: a window of prompt alone)
    contributes nothing: a name whose count is 0 over the whole step is left out, never 0/0,
    and `windows_without_targets` counts such micro-batches where there were any."""
    # lazy: megatron (see the module doc)
    from megatron.core import parallel_state as ps

    from recipes.lib.model import last_stage_to_rank0  # lazy: megatron

    totals = None
    if ps.is_pipeline_last_stage() and reports:
        keys = sorted(reports[0])
        t = torch.stack([torch.stack([r[k].float() for r in reports]).sum(0) for k in keys])
        empty = sum(float(r[keys[0]][1] == 0) for r in reports)
        t = torch.cat([t, torch.tensor([[empty, 1.0]], device=t.device)])
        dist.all_reduce(t, group=ps.get_data_parallel_group())  # on the GPU under NCCL
        totals = {k: (t[i, 0] / t[i, 1]).item() for i, k in enumerate(keys) if t[i, 1] > 0}
        if t[-1, 0] > 0:
            totals["windows_without_targets"] = int(t[-1, 0].item())
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
    # lazy: megatron. The router-loss tracker is process-wide and sized by the first model that
    # records into it: a new one for this run (a tournament trains models of other depths)
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    destroy_moe_metrics_tracker()
    ddp, opt, sched = build_optimizer(model, c)
    train_ds, valid_ds = batches.datasets(c, seed, work / "cache")
    ckpts = work / "checkpoints"
    step = resume.resume(ckpts, ddp, opt, sched, c.global_batch_size)
    resumed = step > 0
    metrics = Metrics(work / "logs", step)
    run_step = scheduled(c, ddp, make_step, schedule_kwargs)
    tokens_per_step, flops = c.global_batch_size * c.seq_length, meta.get("flops_per_token")
    fault = Fault()

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
            rep = {**(reduce_report(reports) or {}), **router_losses(n_micro)}
            row = {"step": step, "tokens": step * tokens_per_step, **rep, "lr": lr,
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
                bar.set_postfix({k: f"{v:.4f}" for k, v in rep.items() if k.endswith("loss")}
                                | {"tok/s": f"{row['tokens_per_s']:.0f}"})
            fault.at("kill_after", step)
            fault.at("signal_after", step)
            fault.pace(t0, resumed)
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


def router_losses(n_micro: int) -> dict:
    """A mixture of experts' router losses of the step just taken (megatron's tracker: the
    load-balancing loss before its weight), each the mean over layers, micro-batches and
    data-parallel ranks, on global rank 0; the tracker is emptied for the next step. {} for a
    dense model, or a weight of 0."""
    # lazy: megatron (see the module doc)
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker, out = get_moe_metrics_tracker(), {}
    for name, entry in sorted(tracker.metrics.items()):
        v = entry.values.detach().float().clone()  # [layers]: this rank's stage's, 0 elsewhere
        dist.all_reduce(v)  # every layer once per TP rank and DP rank
        per = ps.get_tensor_model_parallel_world_size() * ps.get_data_parallel_world_size()
        out[name] = v.sum().item() / (per * n_micro * len(v))
    tracker.clear()
    return out if runtime.is_rank0() else {}


def check_finite(row: dict, ckpts: Path) -> None:
    """Stop at the first NaN / inf loss (on rank 0, where the losses are reduced): megatron would
    go on updating, or skipping, every step (Megatron-LM checks it too); checkpoints stay."""
    bad = {k: v for k, v in row.items() if k.endswith("loss") and not math.isfinite(v)}
    if bad:
        from recipes.lib import resume  # lazy: it imports megatron

        saved = [p.name for p in resume.complete_checkpoints(ckpts)]
        raise BadState(
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
