"""Stage output directories and manifests.

A stage builds its output in `<out>.tmp/`, writes `manifest.json` there last, then renames the
folder into place: `<out>/manifest.json` existing means the stage finished. A finished stage with
the same fingerprint (resolved config + input manifest) is skipped; a different one is refused
unless `run.force=true`; nothing already written is half-overwritten.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recipes.lib import config, runtime

PACKAGES = ("torch", "megatron-core", "nvidia-modelopt", "transformers", "safetensors")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def read_manifest(stage_dir: Path) -> dict:
    f = Path(stage_dir) / "manifest.json"
    if not f.is_file():
        raise FileNotFoundError(f"{stage_dir} has no manifest.json: it is not a finished stage "
                                "output; run the stage that produces it first")
    return json.loads(f.read_text())


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_rev() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def fingerprint(section, extra: dict | None = None, ignore=()) -> str:
    """Hash of a stage's config section (less the `ignore`d fields: those that cannot change
    its result) and `extra` (input fingerprints, layout, seed)."""
    cfg = {k: v for k, v in dataclasses.asdict(section).items() if k not in ignore}
    blob = json.dumps({"cfg": cfg, **(extra or {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageDir:
    """`out` is the final directory; work happens in `tmp`; `commit()` writes the manifest and
    moves it into place (rank 0; other ranks wait)."""

    def __init__(self, stage: str, out: str | Path, fp: str, force: bool):
        self.stage, self.out, self.fp, self.force = stage, Path(out), fp, force
        self.tmp = self.out.with_name(f".{self.out.name}.tmp")
        self.started = time.time()

    def already_done(self) -> bool:
        """True if an identical run finished; raises if the folder holds something else."""
        mf = self.out / "manifest.json"
        if mf.is_file():
            prev = json.loads(mf.read_text())
            if prev.get("fingerprint") == self.fp and not self.force:
                return True
            if not self.force:
                raise FileExistsError(
                    f"{self.out} already holds a different {prev.get('stage')} run "
                    f"(fingerprint {prev.get('fingerprint')} != {self.fp}); choose another "
                    "run.dir or pass run.force=true to replace it")
        elif self.out.exists() and any(self.out.iterdir()):
            raise FileExistsError(f"{self.out} exists, is not empty and has no manifest.json; "
                                  "move it away or choose another run.dir")
        return False

    def begin(self, resumable: dict | None = None) -> Path:
        """Start work in `tmp`. Non-resumable stages start afresh (a leftover is a crashed run).
        Training stages pass `resumable` (their config minus operational keys): an unfinished
        run with the same values is continued, one with other values is refused with the
        differences named (or wiped with run.force=true)."""
        def prepare():
            mark = self.tmp / "run.json"
            keep = False
            if resumable is not None and mark.is_file() and not self.force:
                prev = json.loads(mark.read_text())
                diff = {k: (prev.get(k), v) for k, v in resumable.items() if prev.get(k) != v}
                if diff:
                    raise ValueError(
                        f"{self.tmp} holds an unfinished {self.stage} run with other settings "
                        + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                        + "; restore them to resume, or pass run.force=true to start over")
                keep = True
            if not keep:
                shutil.rmtree(self.tmp, ignore_errors=True)
            (self.tmp / "logs").mkdir(parents=True, exist_ok=True)
            if resumable is not None:
                atomic_write_text(mark, json.dumps(resumable, indent=1, default=str))

        runtime.on_rank0(prepare)
        runtime.barrier()
        return self.tmp

    def commit(self, manifest: dict) -> dict:
        runtime.barrier()
        full = {"stage": self.stage, "fingerprint": self.fp, **manifest,
                "versions": versions(), "git_rev": git_rev(), "argv": sys.argv,
                "started": _iso(self.started), "ended": _iso(time.time()),
                "wall_s": round(time.time() - self.started, 3)}
        if runtime.is_rank0():
            atomic_write_text(self.tmp / "manifest.json", json.dumps(full, indent=2) + "\n")
            old = self.out.with_name(f".{self.out.name}.old")
            if self.out.exists():
                os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        runtime.barrier()
        return full


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved and stopped on a signal; rerun the same command to resume


class Preempted(Exception):
    """A training stage saved a checkpoint and stopped on a signal (exit EXIT_PREEMPTED)."""


def main(run, stage: str, doc: str, argv: list[str] | None = None, also: tuple = ()) -> int:
    """Every stage's entry point: parse `--config` + overrides for `stage`, log on rank 0,
    `run(cfg)`. Exit 0 when finished, EXIT_PREEMPTED when it saved and stopped on a signal (a
    scheduler requeues; the rerun resumes)."""
    cfg = config.parse_args(argv, stage, doc, also)
    runtime.setup_logging(cfg.run.log_level)
    try:
        run(cfg)
    except Preempted as e:
        logging.getLogger(f"recipes.{stage}").warning("stopped: %s", e)
        return EXIT_PREEMPTED
    return 0


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
