"""The training loop shared by `distill` and `teacher_correction`, assembled from megatron-core:
GPTDataset (BlendedMegatronDatasetBuilder, weighted blends), DistributedDataParallel,
get_megatron_optimizer, OptimizerParamScheduler (warm-up + cosine to min_lr) and the pipeline
schedules of get_forward_backward_func. A stage supplies the model and a `loss_func` factory.

Data order: global step s consumes dataset samples [s*G, (s+1)*G) (G = global batch), split over
data-parallel ranks in micro-batches, so the order depends only on (seed, step, G).
Checkpoints: <work>/checkpoints/iter_NNNNNNN/ (model + optimizer as one torch_dist checkpoint,
train_state.json with step, scheduler, RNG, global batch), built as `.iter_NNNNNNN.tmp` and
renamed when complete; the last `keep_last` are kept. A restart with the same command resumes from
the newest complete one; a half-written one is never read.
Preemption: SIGUSR1 (Slurm sends it `--signal` seconds before the time limit) or SIGTERM
(preemption, `scancel`) makes every rank finish its step, save a checkpoint at that step and raise
`Preempted`; the stage's entry point exits with EXIT_PREEMPTED (75) and a rerun resumes there, so a
preemption costs one step and one save, not `save_interval` steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import shutil
import signal
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from recipes.lib import compat, runtime
from recipes.lib.stage import Preempted

log = logging.getLogger("recipes.train")
PRECISIONS = ("fp32", "bf16", "fp8")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
# changing these between restarts does not change the numbers a run produces
OPERATIONAL = {"save_interval", "keep_last", "log_interval", "eval_interval", "eval_iters",
               "fault", "keep_checkpoints", "output", "preempt_signals"}


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    input: str
    """The model to train: a convert / prune / teacher_correction stage folder, or a
    Megatron-Bridge / Megatron-LM checkpoint folder (recipes/lib/interop.py)."""
    input_hf_config: str | None = None
    """Only for a Megatron-LM checkpoint as `input` (or one whose run_config.yaml should be
    overridden): the model's HF config.json, or an HF folder (its tokenizer is used too)."""
    data: list
    """Data stage folders; more than one is a blend."""
    data_weights: list | None = None
    """Blend weights, one per data folder (default: equal)."""
    output: str | None = None
    """Output folder; default <run.dir>/<stage>."""
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
    precision: str = "bf16"
    """fp32 | bf16 | fp8 (Transformer Engine, GPU only: bf16 parameters, fp8 matmuls)."""
    spec: str = "auto"
    """Layer spec: auto (TE when present) | local | te."""
    fp8_recipe: str = "delayed"
    """With precision=fp8: megatron's fp8 recipe, delayed | tensorwise (current scaling) |
    mxfp8 | blockwise (the last two need Blackwell / Hopper-specific TE builds)."""
    fp8_amax_history_len: int = 1024
    """With fp8_recipe=delayed: amax history window (Megatron-LM / NeMo's 1024)."""
    fp8_amax_compute_algo: str = "max"
    """With fp8_recipe=delayed: max | most_recent over the history."""
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


def check_layout(c: TrainConfig, dp: int) -> int:
    """Micro-batches per step; errors when the global batch does not split evenly."""
    if c.global_batch_size % (c.micro_batch_size * dp):
        raise ValueError(f"global_batch_size={c.global_batch_size} is not divisible by "
                         f"micro_batch_size*DP={c.micro_batch_size}*{dp}")
    return c.global_batch_size // (c.micro_batch_size * dp)


# ---- data ----------------------------------------------------------------------------------
class _Tok:
    """What GPTDataset needs of a tokenizer (the data stage already tokenised)."""

    def __init__(self, eod: int, vocab_size: int):
        # pad: megatron's own "no pad token" id (packed windows are never padded); eod would
        # collide with a special token and megatron would replace it with this, warning
        self.eod, self.vocab_size, self.pad = eod, vocab_size, -1
        # megatron hashes this into the dataset cache key
        self.unique_identifiers = {"class": "pretokenized", "eod": eod, "vocab_size": vocab_size}


def build_datasets(c: TrainConfig, seed: int, cache: Path):
    compat.apply()
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from recipes.lib.stage import read_manifest

    first = read_manifest(c.data[0])
    weights = [float(w) for w in (c.data_weights or [1.0] * len(c.data))]
    blend = lambda split: ([str(Path(d) / split) for d in c.data], weights)  # noqa: E731
    cfg = GPTDatasetConfig(
        random_seed=seed, sequence_length=c.seq_length,
        blend_per_split=[blend("train"), blend("valid"), None],
        tokenizer=_Tok(first["eod"], first["vocab_size"]), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        path_to_cache=str(cache), mmap_bin_files=True)
    sizes = [c.train_iters * c.global_batch_size, c.eval_iters * c.global_batch_size, None]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, cfg).build()
    return train, valid


def on_device(batch: dict, module) -> dict:
    """A micro-batch's tensors on the module's device; loss_mask as float."""
    dev = next(module.parameters()).device
    out = {k: v.to(dev) for k, v in batch.items()}
    out["loss_mask"] = out["loss_mask"].float()
    return out


def forward_steps(loss_func: Callable) -> Callable:
    """`make_step(training)` -> megatron's forward_step_func: the model's forward on the batch's
    tokens (labels never passed: the stage computes its losses) and, as the schedule's loss
    function, `loss_func(labels, loss_mask, output)` -> (loss sum, token count, report)."""
    def make_step(training: bool):
        def step(data_iter, m):
            b = on_device(next(data_iter), m)
            logits = m(b["tokens"], b["position_ids"], attention_mask=None)
            return logits, functools.partial(loss_func, b["labels"], b["loss_mask"])

        return step

    return make_step


def micro_batches(ds, step: int, c: TrainConfig, n_micro: int) -> list[dict]:
    """This data-parallel rank's micro-batches of global step `step`."""
    from megatron.core import parallel_state as ps

    r = ps.get_data_parallel_rank()
    base = step * c.global_batch_size + r * n_micro * c.micro_batch_size
    out = []
    for m in range(n_micro):
        items = [ds[base + m * c.micro_batch_size + i] for i in range(c.micro_batch_size)]
        out.append({k: torch.stack([torch.as_tensor(x[k]) for x in items])
                    for k in ("tokens", "labels", "loss_mask", "position_ids")})
    return out


# ---- optimizer ----------------------------------------------------------------------------
def build_optimizer(model, c: TrainConfig):
    """DDP wrapper, megatron optimizer (distributed on GPU with DP>1) and LR schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    # gloo has no reduce-scatter: the distributed optimizer only where NCCL runs
    distributed = torch.cuda.is_available() and ps.get_data_parallel_world_size() > 1
    cfg = model.config
    ddp = DDP(cfg, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=distributed), model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=c.lr, min_lr=c.min_lr, weight_decay=c.weight_decay,
        adam_beta1=0.9, adam_beta2=c.adam_beta2, clip_grad=c.clip_grad,
        bf16=c.precision in ("bf16", "fp8"), params_dtype=cfg.params_dtype,
        use_distributed_optimizer=distributed), [ddp])
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=c.lr, min_lr=c.min_lr, lr_warmup_steps=c.warmup_iters,
        lr_decay_steps=c.train_iters, lr_decay_style="cosine", start_wd=c.weight_decay,
        end_wd=c.weight_decay, wd_incr_steps=c.train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    cfg.no_sync_func = ddp.no_sync
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.grad_scale_func = opt.scale_loss
    return ddp, opt, sched


# ---- checkpoints --------------------------------------------------------------------------
INTEGRITY = "integrity.json"  # {file: [size, crc32]} of every file, written before train_state


def complete_checkpoints(root: Path) -> list[Path]:
    """iter_* folders whose train_state.json (written last, then the rename) exists, oldest
    first. A damaged one is set aside as damaged.iter_* by `newest_good_checkpoint`."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("iter_*")
                  if p.is_dir() and (p / "train_state.json").is_file())


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def _checked_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.name not in (INTEGRITY, "train_state.json"))


def _share(folder: Path, fn) -> dict:
    """{relative path: fn(path)} for every checked file of `folder`, the files split over the
    ranks (torch_dist checkpoints live on a filesystem every rank sees); collective."""
    files = _checked_files(folder)
    mine = {str(p.relative_to(folder)): fn(p) for p in files[dist.get_rank()::dist.get_world_size()]}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with a complete checkpoint folder (None: nothing); collective. Compares
    every file's size and CRC32 with the integrity record written when it was saved."""
    try:
        record = json.loads((path / INTEGRITY).read_text())
        json.loads((path / "train_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable integrity record or train state ({e})"

    def check(p: Path):
        return [p.stat().st_size, _crc32(p)]

    now = _share(path, check)
    for name, want in sorted(record.items()):
        got = now.get(name)
        if got is None:
            return f"{name} is missing"
        if got[0] != want[0]:
            return f"{name} is {got[0]} bytes, {want[0]} were written"
        if got != want:
            return f"{name} has checksum {got[1]:08x}, {want[1]:08x} was written"
    extra = sorted(set(now) - set(record))
    return f"unexpected files {extra[:3]}" if extra else None


def newest_good_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint that passes `verify_checkpoint`; damaged ones are
    reported with their path and renamed damaged.iter_* (kept for inspection, never read)."""
    for ckpt in reversed(complete_checkpoints(root)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        aside = ckpt.with_name(f"damaged.{ckpt.name}.{int(time.time())}")
        log.error("checkpoint %s is damaged: %s; set aside as %s, resuming from the previous "
                  "complete checkpoint instead", ckpt, problem, aside.name)
        if runtime.is_rank0():
            os.replace(ckpt, aside)
        runtime.barrier()
    return None


def _rng_state() -> dict:
    """This rank's RNG states as tensors and plain values (torch.load(weights_only=True) reads
    them back: no pickle)."""
    from megatron.core import tensor_parallel

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(s: dict) -> None:
    from megatron.core import tensor_parallel

    py = s["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(s["tracker"])


def save_checkpoint(root: Path, step: int, ddp, opt, sched, meta: dict, keep_last: int,
                    fault: "Fault") -> None:
    """Model + optimizer (torch_dist), RNG per rank, the integrity record, then train_state.json
    and the rename that makes it complete; collective."""
    from megatron.core import dist_checkpointing

    final = root / f"iter_{step:07d}"
    tmp = root / f".iter_{step:07d}.tmp"
    if runtime.is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    runtime.barrier()
    model_sd = ddp.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)},
                            str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{dist.get_rank()}.pt")
    runtime.barrier()
    record = _share(tmp, lambda p: [p.stat().st_size, _crc32(p)])
    fault.at("kill_in_save", step)
    if runtime.is_rank0():
        (tmp / INTEGRITY).write_text(json.dumps(record, indent=1, sort_keys=True))
        state = {"step": step, "scheduler": sched.state_dict(), **meta}
        (tmp / "train_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():  # a damaged or older save of this step, set aside before this one
            shutil.rmtree(final)
        os.replace(tmp, final)  # complete only now
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    runtime.barrier()


def load_checkpoint(path: Path, ddp, opt, sched) -> dict:
    from megatron.core import dist_checkpointing

    from recipes.lib.checkpoint import check_key_mismatch

    model_sd = ddp.module.sharded_state_dict()
    state = dist_checkpointing.load({"model": model_sd,
                                     "optimizer": opt.sharded_state_dict(model_sd, is_loading=True)},
                                    str(path))
    result = ddp.module.load_state_dict(state["model"], strict=False)
    check_key_mismatch(path, result.missing_keys, result.unexpected_keys)
    opt.load_state_dict(state["optimizer"])
    train_state = json.loads((path / "train_state.json").read_text())
    sched.load_state_dict(train_state["scheduler"])
    _set_rng_state(torch.load(path / f"rng_rank{dist.get_rank()}.pt", weights_only=True))
    return train_state


# ---- metrics ------------------------------------------------------------------------------
class Metrics:
    """metrics.jsonl + TensorBoard on rank 0. On resume, rows after the resumed step are dropped
    so the files read as one run."""

    def __init__(self, logs: Path, resume_step: int):
        self.file = logs / "metrics.jsonl"
        self.tb = None
        if not runtime.is_rank0():
            return
        if self.file.exists():
            keep = [ln for ln in self.file.read_text().splitlines()
                    if ln and json.loads(ln)["step"] <= resume_step]
            self.file.write_text("".join(ln + "\n" for ln in keep))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(logs / "tensorboard"), purge_step=resume_step + 1)

    def log(self, row: dict) -> None:
        if not runtime.is_rank0():
            return
        with open(self.file, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, row["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def last(self) -> dict:
        """The last row written (a run resumed after its final step trains no step)."""
        if not runtime.is_rank0() or not self.file.exists():
            return {}
        rows = self.file.read_text().splitlines()
        return json.loads(rows[-1]) if rows else {}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return runtime.peak_rss_mb()


def reduce_report(reports: list[dict]) -> dict | None:
    """Sum {name: [sum, count]} over micro-batches and DP ranks; {name: mean} on global rank 0."""
    from megatron.core import parallel_state as ps

    from recipes.lib.model import last_stage_to_rank0

    totals = None
    if ps.is_pipeline_last_stage() and reports:
        keys = sorted(reports[0])
        t = torch.stack([torch.stack([r[k].float() for r in reports]).sum(0) for k in keys])
        dist.all_reduce(t, group=ps.get_data_parallel_group())  # on the GPU under NCCL
        totals = {k: (t[i, 0] / t[i, 1]).item() for i, k in enumerate(keys)}
    return last_stage_to_rank0(totals)


# ---- preemption ---------------------------------------------------------------------------
class Fault:
    """Fault injection for tests (`fault=KIND:STEP`), one call per place it can strike:
    kill_after (SIGKILL after step STEP), kill_in_save (SIGKILL once the checkpoint of STEP is
    written but before it is marked complete), signal_after (the last rank alone sends itself
    SIGUSR1 after step STEP), kill_in_finish (SIGKILL at point STEP of a training stage's finish,
    see train_stage)."""

    KINDS = ("kill_after", "kill_in_save", "signal_after", "kill_in_finish")

    def __init__(self, spec: str | None):
        self.kind, self.step = None, None
        if spec:
            kind, _, step = spec.partition(":")
            if kind not in self.KINDS or not step.isdigit():
                raise ValueError(f"fault={spec!r}; use KIND:STEP with KIND one of {self.KINDS}")
            self.kind, self.step = kind, int(step)

    def at(self, kind: str, step: int) -> None:
        if self.kind != kind or self.step != step:
            return
        if kind == "signal_after":
            if dist.get_rank() == dist.get_world_size() - 1:
                os.kill(os.getpid(), signal.SIGUSR1)
        else:
            os.kill(os.getpid(), signal.SIGKILL)


class StopOnSignal:
    """`with StopOnSignal(names) as stop:` turns those signals into a flag (the handler only sets
    it; nothing runs inside a collective or a save). `stop.agreed()`, called by every rank at a
    step boundary, is True when any rank was signalled, so all ranks stop at the same step.
    The previous handlers come back on exit."""

    def __init__(self, names: list):
        self.signals = [getattr(signal, n) for n in names]
        self.received: str | None = None
        self._old: dict = {}

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self):
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def agreed(self) -> bool:
        """Collective over the world group (one int): did any rank receive a signal? (No
        collective when no signal is watched: preempt_signals is the same on every rank.)"""
        if not self.signals or not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received is not None
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([int(self.received is not None)], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


# ---- the loop -----------------------------------------------------------------------------
def train(c: TrainConfig, work: Path, model, make_step: Callable, meta: dict, seed: int,
          stop: StopOnSignal | None = None) -> dict:
    """Train `model` (a megatron module, possibly a ModelOpt DistillationModel) for
    c.train_iters steps, resuming from `work`/checkpoints. `make_step(batches, training)` returns
    the forward_step_func for megatron's schedule. `stop`: signal handlers the stage installed
    before loading (a signal during loading then stops after the first step). Returns final
    metrics."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp = ps.get_data_parallel_world_size()
    n_micro = check_layout(c, dp)
    ddp, opt, sched = build_optimizer(model, c)
    train_ds, valid_ds = build_datasets(c, seed, work / "cache")
    ckpts = work / "checkpoints"
    step, resumed = 0, newest_good_checkpoint(ckpts)
    if resumed:
        prev = json.loads((resumed / "train_state.json").read_text())
        if prev["global_batch_size"] != c.global_batch_size:
            raise ValueError(
                f"{resumed} was trained with global_batch_size={prev['global_batch_size']}, "
                f"this run asks for {c.global_batch_size}. The data order and LR schedule are "
                "defined per step of one global batch, so resuming would skip or repeat data. "
                f"Keep global_batch_size={prev['global_batch_size']}, or start a new run.dir "
                "from an exported checkpoint")
        step = load_checkpoint(resumed, ddp, opt, sched)["step"]
        log.info("resumed from %s (step %d)", resumed, step)
    metrics = Metrics(work / "logs", step)
    fb = get_forward_backward_func()
    tokens_per_step = c.global_batch_size * c.seq_length
    fault = Fault(c.fault)

    def run_step(batches, training: bool):
        kw = {}
        if ps.get_pipeline_model_parallel_world_size() > 1:
            from modelopt.torch.distill.plugins.megatron import (
                get_tensor_shapes_adjust_fn_for_distillation,
            )
            kw["adjust_tensor_shapes_fn"] = get_tensor_shapes_adjust_fn_for_distillation(
                ddp, seq_length=c.seq_length, micro_batch_size=c.micro_batch_size,
                decoder_seq_length=c.seq_length)
        return fb(forward_step_func=make_step(training), data_iterator=iter(batches),
                  model=[ddp], num_microbatches=len(batches), seq_length=c.seq_length,
                  micro_batch_size=c.micro_batch_size, forward_only=not training, **kw)

    def validate() -> dict:
        ddp.eval()
        with torch.no_grad():
            reports = []
            for i in range(c.eval_iters):
                reports += run_step(micro_batches(valid_ds, i, c, n_micro), training=False)
        ddp.train()
        out = reduce_report(reports)
        return {f"valid_{k}": v for k, v in (out or {}).items()}

    final = {}
    bar = tqdm(total=c.train_iters, initial=step, unit="step", disable=not runtime.is_rank0(),
               desc=meta.get("stage", "train"))
    signals = contextlib.nullcontext(stop) if stop else StopOnSignal(c.preempt_signals)
    with signals as stop, bar, contextlib.closing(metrics):
        if step == 0:
            metrics.log({"step": 0, "tokens": 0, **validate()})
        ddp.train()
        while step < c.train_iters:
            batches = micro_batches(train_ds, step, c, n_micro)
            t0 = time.time()
            ddp.zero_grad_buffer()
            opt.zero_grad()
            lr = opt.param_groups[0]["lr"]  # the rate this step uses
            reports = run_step(batches, training=True)
            ok, grad_norm, _ = opt.step()
            sched.step(increment=1)
            step += 1
            dt = time.time() - t0
            rep = reduce_report(reports)
            row = {"step": step, "tokens": step * tokens_per_step, **(rep or {}), "lr": lr,
                   "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt,
                   "step_s": dt, "memory_mb": peak_memory_mb(), "skipped": not ok}
            if step % c.eval_interval == 0 or step == c.train_iters:
                row.update(validate())
            if step % c.log_interval == 0 or "valid_lm_loss" in row or step == c.train_iters:
                metrics.log(row)
            final = row
            bar.update(1)
            if runtime.is_rank0() and rep:
                bar.set_postfix({k: f"{v:.4f}" for k, v in rep.items()}
                                | {"tok/s": f"{row['tokens_per_s']:.0f}"})
            fault.at("kill_after", step)
            fault.at("signal_after", step)
            stopping = stop.agreed() and step < c.train_iters
            if stopping or step % c.save_interval == 0 or step == c.train_iters:
                save_checkpoint(ckpts, step, ddp, opt, sched,
                                {"global_batch_size": c.global_batch_size, **meta},
                                c.keep_last, fault)
            if stopping:
                raise Preempted(
                    f"{stop.received or 'a signal on another rank'}: saved step {step} of "
                    f"{c.train_iters} to {ckpts}; rerun the same command to resume")
    return final or metrics.last()
