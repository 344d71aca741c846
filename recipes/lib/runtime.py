"""Process groups, model parallelism, seeding and rank-0 logging.

Works the same under `torchrun` (reads RANK/WORLD_SIZE/MASTER_ADDR from the environment) and as a
plain single process (a world of one, its store in memory: no port). gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import logging
import os
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from recipes.lib import compat, quiet
from recipes.lib.errors import BadState, Refusal

log = logging.getLogger("recipes")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_rank0() -> bool:
    return rank() == 0


def setup_logging(level: str = "INFO") -> None:
    """Rank 0 logs at `level`; other ranks only warnings and errors. Upstream messages the recipe
    expects are dropped (recipes/lib/quiet.py) unless level is DEBUG."""
    logging.basicConfig(
        level=getattr(logging, level) if is_rank0() else logging.WARNING,
        format=f"%(asctime)s [rank{rank()}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    quiet.install_log_filters(level)


def launch_problem(env=os.environ) -> str | None:
    """Why this process must not start a world of one, or None: it is one task of an srun step
    of several started without RANK / WORLD_SIZE (`srun -n 8 python -m recipes.distill`), where
    each task would run the whole stage alone, all on the first GPU. The batch script itself has
    SLURM_NTASKS but no SLURM_STEP_NUM_TASKS (read on the real scheduler)."""
    n = int(env.get("SLURM_STEP_NUM_TASKS") or 1)
    if "RANK" in env or n <= 1:
        return None
    return (f"this is task {env.get('SLURM_PROCID', '?')} of the {n} of an srun step, started "
            "without RANK / WORLD_SIZE: each would run the whole stage alone; launch with `make "
            "<stage> LAUNCH=slurm` (scripts/slurm/stage.sbatch.in sets RANK=$SLURM_PROCID, "
            "WORLD_SIZE=$SLURM_NTASKS, LOCAL_RANK=$SLURM_LOCALID, MASTER_ADDR, MASTER_PORT), or "
            "export those in each task")


def init(tp: int, pp: int, seed: int = 1234, ep: int = 1) -> None:
    """Initialise torch.distributed and megatron's model-parallel groups (TP x PP x DP = world;
    `ep` expert-parallel ranks are carved out of DP, the experts' TP being TP)."""
    compat.apply()
    # lazy: megatron after compat.apply(); light stages (data, report) import this module
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # a GPU's caching allocator fragments less with expandable segments (a long run's
        # changing activation shapes); the user's own setting wins
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        if "RANK" in os.environ:  # torchrun / srun set the rendezvous
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend=backend)
        else:  # plain `python -m ...`: a world of one, its store in this process (a free
            # port, picked then bound, raced: EADDRINUSE with 8 stages started at once on the H200)
            if (why := launch_problem()) is not None:
                raise Refusal(why)
            dist.init_process_group(backend=backend, rank=0, world_size=1, store=dist.HashStore())
    ws = dist.get_world_size()
    if ws % (tp * pp * ep):
        raise Refusal(
            f"world size {ws} is not divisible by TP*PP*EP={tp}*{pp}*{ep}; launch TP*PP*DP "
            f"processes, DP a multiple of EP (e.g. torchrun --nproc-per-node {tp * pp * ep})"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep)
    seed_everything(seed)
    # the inference tracker avoids CUDA RNG state (absent on CPU); on GPU use the real tracker
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not torch.cuda.is_available())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state  # lazy: as in init()

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def distributed(tp: int, pp: int, seed: int = 1234, ep: int = 1):
    """`with distributed(tp, pp): ...` initialises and always tears down."""
    init(tp, pp, seed, ep)
    try:
        yield
    finally:
        shutdown()


def on_rank0(fn):
    """Run `fn()` on rank 0 only; if it raises, every rank raises (no rank hangs at a barrier
    waiting for a rank that died). Returns fn's result on rank 0, None elsewhere."""
    result, err = None, None
    if is_rank0():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            err = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [None if err is None else f"{type(err).__name__}: {err}"]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and err is None:
            raise BadState(f"rank 0 failed: {box[0]}")
    if err is not None:
        raise err
    return result


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB. Reads VmHWM (per address space); getrusage's
    ru_maxrss is not used because Linux carries it across exec, so a child started by a big
    parent would report the parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.cache
def te_installed() -> bool:
    """Transformer Engine with its PyTorch extension, importable the way megatron needs it
    (megatron/core/extensions/transformer_engine.py sets HAVE_TE only when
    `transformer_engine.pytorch` and its fp8 module import). `import transformer_engine` alone
    proves nothing: it succeeds with only the core library (transformer-engine-cu13) installed,
    and megatron's TE spec then fails when the model is built."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        # lazy: loads TE's CUDA extension; only asked where TE is installed
        import transformer_engine.pytorch  # noqa: F401
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError from a missing CUDA library
        log.warning("Transformer Engine is installed but its PyTorch extension does not import "
                    "(%s: %s): using megatron's local layer spec", type(e).__name__, e)
        return False
    return True


def have_te() -> bool:
    """Transformer Engine usable here: a CUDA machine and TE's PyTorch extension."""
    return torch.cuda.is_available() and te_installed()


SPECS = ("auto", "local", "te")


def resolve_spec(kind: str = "auto") -> str:
    """The one place a layer spec is chosen, for every stage: 'local' (pure megatron-core, CPU
    and GPU), 'te' (Transformer Engine, CUDA only) or 'auto' (TE where it is importable on a
    CUDA machine, else local). Both load the same checkpoints (checkpoint.load)."""
    if kind not in SPECS:
        raise Refusal(f"spec={kind!r}; use one of {SPECS}")
    if kind == "auto":
        return "te" if have_te() else "local"
    if kind == "te" and not have_te():
        raise Refusal("spec=te needs Transformer Engine on a CUDA GPU (the NVIDIA container, "
                      "docker/); use spec=auto or spec=local here")
    return kind


# ---- precision=auto ------------------------------------------------------------------------
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 matmul instructions (x86)
AUTO_FILE = ".auto_precision.json"  # the choice, once per run directory


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where the file is missing)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_matmul_speedup(n: int = 512, budget_s: float = 0.1) -> float:
    """fp32 time / bf16 time of an n x n matmul on this CPU (best of repeats, ~`budget_s` in
    all). torch's own answer (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) is True wherever
    oneDNN can emulate bf16, which on a CPU without bf16 instructions runs ~8x slower."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)

    def best(x, y) -> float:
        torch.mm(x, y)  # warm-up (oneDNN primitive creation)
        times, end = [], time.perf_counter() + budget_s / 2
        while len(times) < 3 or (time.perf_counter() < end and len(times) < 20):
            t0 = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(a, b) / best(a.bfloat16(), b.bfloat16())


def aten_flags(flags: set[str], capability: str | None = None) -> set[str]:
    """An x86 CPU's flags as PyTorch's own kernels use them: where they run narrower than
    AVX-512 (ATEN_CPU_CAPABILITY=avx2, or a build without it), its bf16 kernels are not native
    either, whatever the CPU has."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    if "avx2" in flags and not capability.startswith("AVX512"):
        return flags - set(CPU_BF16_FLAGS) - {f for f in flags if f.startswith("avx512")}
    return flags


def choose_precision(cuda: bool, flags: set[str], speedup: float | None) -> dict:
    """The decision behind precision=auto: bf16 on CUDA; on a CPU bf16 only where it is natively
    fast (bf16 instructions and a bf16 matmul at least as fast as fp32), else fp32."""
    if cuda:
        return {"precision": "bf16", "why": "CUDA GPU: bf16"}
    native = sorted(flags & set(CPU_BF16_FLAGS))
    if not native:
        return {"precision": "fp32", "why": "CPU without native bf16 (no " + " / ".join(
            CPU_BF16_FLAGS) + "): bf16 would be emulated, several times slower than fp32"
            + (f" (a bf16 matmul ran {speedup:.2f}x the fp32 speed)" if speedup else "")}
    if speedup is not None and speedup < 1.0:
        return {"precision": "fp32", "why": f"CPU with {', '.join(native)}, but a bf16 matmul "
                f"ran only {speedup:.2f}x the fp32 speed here"}
    return {"precision": "bf16", "why": f"CPU with native bf16 ({', '.join(native)}); a bf16 "
            f"matmul ran {speedup:.2f}x the fp32 speed"}


def auto_precision(run_dir: str | Path) -> dict:
    """precision=auto for this machine: {precision, why}, decided once per run directory and
    kept in <run_dir>/.auto_precision.json, so every stage and every rank of a run agrees (and a
    resume keeps the precision it started with). The first process to get here (a lock on the
    file) measures; the others read."""
    path = Path(run_dir) / AUTO_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return json.loads(path.read_text())
        cuda = torch.cuda.is_available()
        choice = choose_precision(cuda, aten_flags(cpu_flags()),
                                  None if cuda else bf16_matmul_speedup())
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(choice, indent=1) + "\n")
        os.replace(tmp, path)
    return choice
