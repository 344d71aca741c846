"""Training checkpoints: how a training run is saved, verified and resumed.

    <work>/checkpoints/iter_NNNNNNN/   model + optimizer as one torch_dist checkpoint,
                                       rng_rank<r>.pt (this rank's RNG states, as tensors),
                                       integrity.json ({file: [size, crc32]}),
                                       train_state.json (step, scheduler, global batch; last)

A checkpoint is built as `.iter_NNNNNNN.tmp` and renamed when complete; the last `keep_last` are
kept. Resuming takes the newest complete one that passes its integrity record; a damaged one is
reported with its path, set aside as `damaged.iter_*` and the previous one used. A half-written
one is never read.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from recipes.lib import checkpoint, compat, integrity, runtime, train
from recipes.lib.preempt import Fault
from recipes.lib.errors import Refusal

compat.importable()  # megatron's import needs triton or its stand-in; apply() at use
from megatron.core import dist_checkpointing, tensor_parallel  # noqa: E402
from megatron.core.optimizer import distrib_optimizer  # noqa: E402

log = logging.getLogger(__name__)


# the distributed optimizer's checkpoint layout: one tensor per buffer, parallel save and load,
# resharding over DP (Megatron-LM's default); megatron 0.19's own default,
# fully_sharded_model_space, fails to save ("ShardedTensor.flattened_range is not supported")
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def complete_checkpoints(root: Path) -> list[Path]:
    """iter_* folders whose train_state.json (written last, then the rename) exists, oldest
    first. A damaged one is set aside as damaged.iter_* by `newest_good_checkpoint`."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("iter_*")
                  if p.is_dir() and (p / "train_state.json").is_file())


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with a complete checkpoint folder (None: nothing); collective. Compares
    every file's size and CRC32 with the integrity record written when it was saved; a file the
    record lacks is wrong too."""
    try:
        record = integrity.read(path)
        json.loads((path / "train_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"unreadable integrity record or train state ({e})"
    if record is None:
        return f"no {integrity.RECORD}"
    return integrity.problem(path, record, skip=("train_state.json",))


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
                    fault: Fault) -> None:
    """Model + optimizer (torch_dist), RNG per rank, the integrity record, then train_state.json
    and the rename that makes it complete; collective."""
    final = root / f"iter_{step:07d}"
    tmp = root / f".iter_{step:07d}.tmp"
    if runtime.is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    runtime.barrier()
    model_sd = ddp.module.sharded_state_dict()
    checkpoint.dist_save({"model": model_sd, "optimizer": opt.sharded_state_dict(
        model_sd, metadata=OPTIMIZER_METADATA)}, tmp)
    torch.save(_rng_state(), tmp / f"rng_rank{dist.get_rank()}.pt")
    runtime.barrier()
    record = integrity.record(tmp)
    fault.at("kill_in_save", step)
    if runtime.is_rank0():
        integrity.save(tmp, record)
        state = {"step": step, "scheduler": sched.state_dict(), **meta}
        (tmp / "train_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():  # a damaged or older save of this step, set aside before this one
            shutil.rmtree(final)
        os.replace(tmp, final)  # complete only now
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    runtime.barrier()


def _torch_adam_in_distributed_optimizers(opt) -> list:
    """The DistributedOptimizers in `opt` that run torch's Adam (no TE or apex: a CPU, or a GPU
    without them), which megatron 0.19 mishandles on load (the two helpers below)."""
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [o for o in getattr(opt, "chained_optimizers", [opt])
            if isinstance(o, distrib_optimizer.DistributedOptimizer)]


def _optimizer_state_to_load_into(opt) -> None:
    """megatron's DistributedOptimizer builds the sharded state dict to load into from its inner
    optimizer's state, which torch's Adam has only after a first step
    (megatron/core/optimizer/distrib_optimizer.py `state_dict`: `assert len(steps) == 1`). Give
    a fresh one megatron's own dummy state, which the load replaces."""
    for o in _torch_adam_in_distributed_optimizers(opt):
        if not o.optimizer.state:
            o._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(opt) -> None:
    """megatron's `DistributedOptimizer.load_state_dict` gives every parameter's torch Adam state
    one shared `step` tensor, and then copies the load template's step (the dummy state's 1)
    into it with the parameter states: Adam's bias correction restarts, and each parameter's
    update increments the shared step again (tests/stages/test_distill.py's resume test caught
    it at the second step after a resume). The step the checkpoint recorded is in the loaded
    param groups: one tensor per parameter with it, as torch keeps them."""
    for o in _torch_adam_in_distributed_optimizers(opt):
        for group in o.optimizer.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                if "step" in o.optimizer.state.get(p, {}):
                    o.optimizer.state[p]["step"] = torch.tensor(float(group["step"]))


def load_checkpoint(path: Path, ddp, opt, sched) -> dict:
    model_sd = ddp.module.sharded_state_dict()
    _optimizer_state_to_load_into(opt)
    state = dist_checkpointing.load({"model": model_sd, "optimizer": opt.sharded_state_dict(
        model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)}, str(path))
    result = ddp.module.load_state_dict(state["model"], strict=False)
    checkpoint.check_key_mismatch(path, result.missing_keys, result.unexpected_keys)
    with torch.no_grad():  # fp32: the distributed optimizer's shards are views of the params
        opt.load_state_dict(state["optimizer"])
    _restore_adam_steps(opt)
    train.fused_cpu_adam(opt)  # the loaded param groups carry the saving run's kernel choice
    train_state = json.loads((path / "train_state.json").read_text())
    sched.load_state_dict(train_state["scheduler"])
    _set_rng_state(torch.load(path / f"rng_rank{dist.get_rank()}.pt", weights_only=True))
    return train_state


def resume(root: Path, ddp, opt, sched, global_batch_size: int) -> int:
    """Load the newest good checkpoint under `root` into the model, optimizer and scheduler;
    the step it was saved at (0: none). A checkpoint of another global batch is refused: the
    data order and LR schedule are defined per step of one global batch."""
    resumed = newest_good_checkpoint(root)
    if resumed is None:
        return 0
    prev = json.loads((resumed / "train_state.json").read_text())
    if prev["global_batch_size"] != global_batch_size:
        raise Refusal(
            f"{resumed} was trained with global_batch_size={prev['global_batch_size']}, "
            f"this run asks for {global_batch_size}. The data order and LR schedule are "
            "defined per step of one global batch, so resuming would skip or repeat data. "
            f"Keep global_batch_size={prev['global_batch_size']}, or start a new run.dir "
            "from an exported checkpoint")
    step = load_checkpoint(resumed, ddp, opt, sched)["step"]
    log.info("resumed from %s (step %d)", resumed, step)
    return step
