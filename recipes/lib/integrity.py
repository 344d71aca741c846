"""The integrity record of a checkpoint folder: `integrity.json`, {relative path: [size, crc32]}
of every file, written by the save before the rename that makes the folder complete.

Stage checkpoints (`<stage>/iter_NNNNNNN/`, checkpoint.py) and training checkpoints (resume.py)
carry one; an exported HF folder carries its record in its manifest ("integrity"), which
evaluate checks. A reader checks the sizes before anything expensive (a truncated copy is named
without reading a byte) and the checksums before loading (a flipped bit would otherwise load
and travel on silently: export's parity check compares two models built from the same damaged
weights). The files are split over the ranks, which all see the checkpoint's filesystem; zlib's
CRC32 runs faster than most disks read (docs/measured.md). Folders without a record
(written by Megatron-Bridge, Megatron-LM, or by this recipe before the record existed) are read
unchecked.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch.distributed as dist
from recipes.lib.errors import Refusal

RECORD = "integrity.json"


def crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def _split(names: list[str], fn, collective: bool = True) -> dict:
    """{name: fn(name)} over `names`, split over the ranks; collective where a process group
    exists (unless not `collective`: this process does all)."""
    if not collective or not (dist.is_available() and dist.is_initialized()) \
            or dist.get_world_size() == 1:
        return {n: fn(n) for n in names}
    mine = {n: fn(n) for n in names[dist.get_rank()::dist.get_world_size()]}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def files(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Every file under `folder` but the record and `skip` (names), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if p.is_file() and p.name not in (RECORD, *skip))


def record(folder: Path, collective: bool = True) -> dict:
    """{relative path: [size, crc32]} of `files(folder)`; collective unless not `collective`."""
    folder = Path(folder)
    return _split(files(folder), lambda n: [(folder / n).stat().st_size, crc32(folder / n)],
                  collective)


def save(folder: Path, rec: dict) -> None:
    """Write the record `rec` as `folder/integrity.json` (one process)."""
    (Path(folder) / RECORD).write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")


def write(folder: Path) -> None:
    """Record `folder`'s files in `folder/integrity.json`; collective (rank 0 writes)."""
    rec = record(folder)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        save(folder, rec)


def read(folder: Path) -> dict | None:
    """`folder`'s record, None where it has none; an unreadable one raises ValueError."""
    f = Path(folder) / RECORD
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Refusal(f"unreadable integrity record {f} ({e})") from None


def size_problem(folder: Path, rec: dict) -> str | None:
    """A recorded file missing or of another size (None: none); reads no data."""
    for name, (size, _) in sorted(rec.items()):
        p = Path(folder) / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} is {p.stat().st_size} bytes, {size} were written"
    return None


def problem(folder: Path, rec: dict, skip: tuple[str, ...] | None = None) -> str | None:
    """What differs between `folder` and its record `rec` (None: nothing): a file missing, of
    another size or checksum; with `skip` (exact: the training checkpoints), also a file the
    record lacks but those. Collective: every rank returns the same."""
    folder = Path(folder)
    if found := size_problem(folder, rec):
        return found
    if skip is not None and (extra := sorted(set(files(folder, skip)) - set(rec))):
        return f"unexpected files {extra[:3]}"
    now = _split(sorted(rec), lambda n: crc32(folder / n))
    for name, (_, want) in sorted(rec.items()):
        if now[name] != want:
            return f"{name} has checksum {now[name]:08x}, {want:08x} was written"
    return None


def refuse_damaged(folder: Path, checksums: bool = True, rec: dict | None = None) -> None:
    """Raise, naming the file, where a folder differs from its record (`rec`, else its
    integrity.json): the sizes only (reads no data), or the sizes and the checksums
    (collective). A folder without a record passes."""
    rec = read(folder) if rec is None else rec
    found = rec and (problem(folder, rec) if checksums else size_problem(folder, rec))
    if found:
        raise Refusal(f"{folder} is damaged: {found}; its files are not what was written "
                      "(a partial copy, a failing disk): restore the folder, or rerun the "
                      "stage that wrote it with run.force=true")
