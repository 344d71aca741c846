"""Disk space: checked before a stage writes, and named when it runs out anyway.

Before: every stage that writes checkpoints or datasets knows its output's size in advance
(`nbytes`, `training_nbytes`: parameters x bytes; a dataset's tokens); `check` refuses to start,
naming the folder, the bytes needed and the bytes free. After: a write that fails on a full
filesystem (an OSError with ENOSPC, or whatever an upstream writer makes of it, such as
torch.save's "[enforce fail at inline_container.cc] unexpected pos") becomes `NoSpace`: "no
space left on <device> while writing <path>", and the stage's unfinished work is removed (a
training stage keeps its complete checkpoints, which a rerun resumes from) so the disk is not
left full.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from recipes.lib.arch import Arch
from recipes.lib.errors import Refusal

NEARLY_FULL = 64 << 20  # a write that fails with less than this left failed for want of space


class NoSpace(Refusal, OSError):
    """The filesystem of a stage's output is (or would be) full."""


BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def nbytes(arch: Arch, dtype: str, padded: bool = True) -> int:
    """Bytes of `arch`'s weights in `dtype` (with the padded vocabulary rows a megatron checkpoint
    holds; without, an HF export)."""
    rows = (arch.padded_vocab_size - arch.vocab_size) * arch.hidden_size if padded else 0
    return (arch.num_params() + rows * (1 if arch.tie_embeddings else 2)) * BYTES[dtype]


def training_nbytes(arch: Arch, dtype: str) -> int:
    """Bytes of one training checkpoint: the model in `dtype` and the optimizer (fp32 Adam
    moments, plus fp32 main weights when the model is not fp32)."""
    return nbytes(arch, dtype) + nbytes(arch, "fp32") * (2 if dtype == "fp32" else 3)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    return f"{n} B"


def _existing(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def size(path: Path) -> int:
    """Bytes under `path` (0 when absent)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def check(folder: Path, need: int, what: str) -> None:
    """Refuse before writing when the filesystem of `folder` has fewer than `need` bytes free."""
    free = free_bytes(folder)
    if need > free:
        raise NoSpace(f"{what} needs about {human(need)} in {folder}, but its filesystem "
                      f"({device(folder)}) has {human(free)} free: free some space, or choose "
                      "another run.dir / output folder")


def device(path: Path) -> str:
    """The device and mount point holding `path` (/proc/mounts), e.g. '/dev/vda (mounted at /)'."""
    path, best = str(_existing(path)), ("?", "/")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mount = line.split()[:2]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) \
                    and len(mount) >= len(best[1]):
                best = (dev, mount)
    except OSError:
        pass
    return f"{best[0]} (mounted at {best[1]})"


def out_of_space(e: BaseException, folder: Path) -> bool:
    """Whether `e` failed a write for want of space on `folder`'s filesystem: ENOSPC anywhere in
    its chain, or a filesystem left (nearly) full, whatever the writer raised."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return free_bytes(folder) < NEARLY_FULL
    except OSError:
        return False


def discard(tmp: Path, resumable: bool) -> str:
    """Remove a failed stage's unfinished work from a full disk: all of it, or for a training
    stage the half-written pieces only (complete checkpoints are kept to resume from).
    Returns what was done, for the message."""
    tmp = Path(tmp)
    if not resumable:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"the unfinished {tmp} was removed"
    for p in sorted(tmp.rglob("*.tmp*"), reverse=True):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return f"its half-written files were removed; the complete checkpoints in {tmp} are kept " \
           "and a rerun resumes from them"


def os_path_of(e: BaseException) -> str | None:
    """The file a failed write names, if any."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.filename:
            return os.fsdecode(seen.filename)
        seen = seen.__cause__ or seen.__context__
    return None
