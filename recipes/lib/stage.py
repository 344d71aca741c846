"""Stage output directories and manifests.

A stage builds its output in `.<out>.tmp/`, writes `manifest.json` there last, then renames the
folder into place: `<out>/manifest.json` existing means the stage finished. A finished stage with
the same fingerprint (resolved config) and the same input signatures is skipped; one with another
config, or whose inputs changed since, is refused unless `run.force=true`; nothing already written
is half-overwritten. Writing the manifest commits; a kill in the renames that follow it (the
replaced output aside, the new one in) is finished by the next run on the folder (`settle`).

Input signatures (`signature`): a stage folder is the sha256 of its manifest.json (which changes
whenever that stage re-ran); a file is its size and mtime (plus its sha256 where a stage hashes).
Locking: rank 0 holds an exclusive `flock` on `.<out>.lock` from the first check until commit (or
exit), so a second run on the same folder fails at once naming the holder. flock is per host
on local filesystems; across nodes it holds on NFSv4 (emulated with POSIX locks) and on Lustre
mounted with `-o flock`, not on filesystems mounted with `localflock`; on one that refuses locks
(`noflock`, NFS `nolock`) the stage runs unlocked, with a warning.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from recipes.lib import config, disk, runtime
from recipes.lib.preempt import EXIT_PREEMPTED, Preempted, ignore_late_signals
from recipes.lib.errors import BadState, MissingInput, NotAllowed, OutputExists, Refusal

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


CHECKPOINT_STAGES = ("convert", "teacher_correction", "prune", "distill")


def read_manifest(stage_dir: Path, stages: tuple[str, ...] | None = None,
                  key: str | None = None) -> dict:
    """The manifest of a finished stage folder; with `stages`, one of those stages' (`key`, the
    config key that named the folder, goes into the error)."""
    f = Path(stage_dir) / "manifest.json"
    if not f.is_file():
        raise MissingInput(f"{stage_dir} has no manifest.json: it is not a finished stage "
                           "output; run the stage that produces it first")
    m = json.loads(f.read_text())
    if stages and m.get("stage") not in stages:
        raise Refusal(f"{(key + '=') if key else ''}{stage_dir} is a {m.get('stage')!r} stage "
                      f"output; this needs the output of {' or '.join(stages)} (e.g. "
                      f"<run.dir>/{stages[0]})")
    return m


def signature(path: Path | list[Path], hash_files: bool = False):
    """What an input is (see the module doc): a stage folder -> 'manifest:<sha256>'; a file or a
    list of files (folders in it are skipped) -> {path: [size, mtime_ns] (+ sha256 with
    hash_files)}."""
    if isinstance(path, (str, Path)) and (Path(path) / "manifest.json").is_file():
        return "manifest:" + sha256_file(Path(path) / "manifest.json")
    files = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    files = [f for f in files if not f.is_dir()]  # a folder in a list is there for the overlap check
    out = {}
    for f in files:
        st = f.stat()
        out[str(f)] = [st.st_size, st.st_mtime_ns] + ([sha256_file(f)] if hash_files else [])
    return out


def _changed(prev, now) -> list[str]:
    """Names of what differs between two signatures of one input."""
    if isinstance(prev, dict) and isinstance(now, dict):
        def same(a, b):  # size and mtime; the sha256 too where both runs hashed
            return a is not None and b is not None and a[:2] == b[:2] and \
                (len(a) < 3 or len(b) < 3 or a[2] == b[2])
        return sorted(k for k in {*prev, *now} if not same(prev.get(k), now.get(k)))
    return [] if prev == now else ["manifest.json (the stage was re-run)"]


def versions(packages: tuple[str, ...] = PACKAGES) -> dict:
    out = {"python": sys.version.split()[0]}
    for p in packages:
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
    its result, and config.ADDED_FIELDS at their earlier-results value) and `extra` (layout,
    seed). Inputs are compared separately (`signature`)."""
    cfg = {k: v for k, v in dataclasses.asdict(section).items() if k not in ignore}
    blob = json.dumps(config.without_added({"cfg": cfg, **(extra or {})}), sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageDir:
    """`out` is the final directory; work happens in `tmp`; `commit()` writes the manifest and
    moves it into place (rank 0; other ranks wait). `inputs` = {role: stage folder, file or list
    of files}: their signatures decide whether a finished output is still valid, and the output
    may not be, contain or lie inside any of them."""

    def __init__(self, stage: str, out: str | Path, fp: str, force: bool,
                 inputs: dict | None = None, hash_files: bool = False):
        self.stage, self.out, self.fp, self.force = stage, Path(out), fp, force
        self.tmp = self.out.with_name(f".{self.out.name}.tmp")
        self.started = time.time()
        self.inputs = {k: v for k, v in (inputs or {}).items() if v is not None}
        _refuse_overlap(self.out, self.inputs)
        self.signatures = {k: signature(v, hash_files) for k, v in self.inputs.items()}

    def already_done(self, lock: bool = True) -> bool:
        """True if an identical run finished on the same inputs; raises if the folder holds
        something else. Takes the folder's lock first (held until commit or exit), unless
        `lock=False`: a job doing one part of the stage beside others (prune's tournament
        candidates) asks without it."""
        if lock:
            lock_folder(self.out, self.stage)
            self.settle()
        mf = self.out / "manifest.json"
        if mf.is_file():
            prev = json.loads(mf.read_text())
            if prev.get("stage") != self.stage:
                raise OutputExists(
                    f"{self.out} holds the output of stage {prev.get('stage')!r}, not "
                    f"{self.stage!r}; run.force=true replaces only this stage's own output: "
                    "choose another output folder")
            if self.force:
                return False
            if prev.get("fingerprint") != self.fp:
                raise OutputExists(
                    f"{self.out} already holds a different {prev.get('stage')} run "
                    f"(fingerprint {prev.get('fingerprint')} != {self.fp}); choose another "
                    "run.dir or pass run.force=true to replace it")
            if "input_signature" not in prev:  # written before inputs were recorded
                logging.getLogger("recipes.stage").warning(
                    "%s was written by an older version that did not record its inputs: "
                    "reused unverified; run.force=true redoes it", self.out)
                release_locks()
                return True
            old = prev["input_signature"]
            changed = {k: _changed(old.get(k), v) for k, v in self.signatures.items()}
            changed = {k: v for k, v in changed.items() if v}
            if changed:
                raise OutputExists(
                    f"{self.out}: input changed since it was made ({prev.get('ended')}): "
                    + "; ".join(f"{k} ({', '.join(Path(x).name for x in v[:3])}"
                                f"{' ...' if len(v) > 3 else ''})" for k, v in changed.items())
                    + "; run.force=true to redo it from the new input")
            release_locks()
            return True
        elif self.out.exists() and any(self.out.iterdir()):
            raise OutputExists(f"{self.out} exists, is not empty and has no manifest.json; "
                               "move it away or choose another run.dir")
        return False

    def settle(self) -> None:
        """Finish a commit that a kill interrupted (rank 0, under the lock; the other ranks wait
        for it). The manifest in the work folder is the commit point: once it is written the
        new output is complete, and `publish`'s renames are redone (killed between moving the
        replaced output aside and the new one in, neither would show). A copy of a replaced
        output left aside (as large as the output) is removed."""
        pending = self.tmp / "manifest.json"
        if runtime.rank() != 0:  # rank 0 renames within moments of taking the lock
            deadline = time.time() + 120
            while pending.is_file() and time.time() < deadline:
                time.sleep(0.2)
            return
        if pending.is_file():
            self.publish()
            logging.getLogger("recipes.stage").warning(
                "%s: a kill interrupted this stage's commit; its finished output is in place "
                "now", self.out)
        shutil.rmtree(self.out.with_name(f".{self.out.name}.old"), ignore_errors=True)

    def publish(self) -> None:
        """Rank 0: the work folder, its manifest written, into place; the output it replaces is
        moved aside first and removed last (two renames: see `settle`)."""
        old = self.out.with_name(f".{self.out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        shutil.rmtree(old, ignore_errors=True)

    def begin(self, resumable: dict | None = None, need: int = 0) -> Path:
        """Start work in `tmp`. Non-resumable stages start afresh (a leftover is a crashed run).
        Training stages pass `resumable` (their config minus operational keys): an unfinished
        run with the same values and inputs is continued, with run.force=true too (a requeued
        job reruns its command line); one with other values is refused naming them, or wiped
        with run.force=true. `need`: the bytes the stage will write, checked against the free
        space first (what a resumed run already wrote counts)."""
        lock_folder(self.out, self.stage)
        self.settle()
        self.resumable = resumable is not None
        if need:  # collective: every rank refuses together
            runtime.on_rank0(lambda: disk.check(self.out.parent, need - (
                disk.size(self.tmp) if self.resumable and (self.tmp / "run.json").is_file()
                else 0), f"stage {self.stage}"))
        if resumable is not None:
            resumable = {**resumable, "input_signature": self.signatures}

        def prepare():
            mark = self.tmp / "run.json"
            keep = resumable is not None and mark.is_file()
            if keep and not self.force:  # raises, naming what differs
                self._same_run(mark, resumable, "restore them to resume, or pass "
                               "run.force=true to start over")
            elif keep:
                diff = differences(mark, resumable)
                keep = not diff
                logging.getLogger("recipes.stage").warning(
                    "run.force=true: %s", f"the unfinished {self.stage} run in {self.tmp} had "
                    f"other settings or inputs ({diff}): starting over" if diff else
                    f"continuing the unfinished {self.stage} run in {self.tmp}, which has the "
                    "same settings and inputs (remove that folder to start over)")
            if not keep:
                shutil.rmtree(self.tmp, ignore_errors=True)
            (self.tmp / "logs").mkdir(parents=True, exist_ok=True)
            if resumable is not None:
                atomic_write_text(mark, json.dumps(resumable, indent=1, default=str))

        runtime.on_rank0(prepare)
        runtime.barrier()
        _WORKING.append(self)
        return self.tmp

    def join(self, resumable: dict) -> Path:
        """The work folder of an unfinished resumable run with these settings and inputs, for a
        job that does one part of it beside others (prune's tournament candidates as Slurm
        jobs): without the stage's lock (each part locks its own, `lock_folder`)."""
        mark = self.tmp / "run.json"
        if not mark.is_file():
            raise MissingInput(f"{self.tmp} holds no unfinished {self.stage} run to join: "
                               "run the job that starts it first")
        self._same_run(mark, {**resumable, "input_signature": self.signatures},
                       "run every job of the chain with the same settings")
        return self.tmp

    def _same_run(self, mark: Path, resumable: dict, fix: str) -> None:
        if diff := differences(mark, resumable):
            raise Refusal(f"{self.tmp} holds an unfinished {self.stage} run with other "
                          f"settings or inputs: {diff}; {fix}")

    def commit(self, manifest: dict) -> dict:
        runtime.barrier()
        # run_id: a rerun's manifest differs even when it finishes within the same second as
        # the run it replaces, so its downstream stages see that their input changed
        full = {"stage": self.stage, "fingerprint": self.fp, "run_id": uuid.uuid4().hex,
                **manifest, "input_signature": self.signatures,
                "versions": versions(), "git_rev": git_rev(), "argv": sys.argv,
                "started": _iso(self.started), "ended": _iso(time.time()),
                "wall_s": round(time.time() - self.started, 3)}
        if runtime.is_rank0():
            atomic_write_text(self.tmp / "manifest.json", json.dumps(full, indent=2) + "\n")
            self.publish()
        if self in _WORKING:
            _WORKING.remove(self)
        release_locks()
        runtime.barrier()
        return full


_HELD: dict[str, int] = {}  # output folder -> the lock's file descriptor (this process)
_WORKING: list[StageDir] = []  # begun and not yet committed by this process


def no_space(e: BaseException) -> None:
    """Raise disk.NoSpace from `e` when `e` is a write that failed for want of space under a stage
    folder this process is writing, after removing its unfinished work (rank 0; disk.discard)."""
    for sdir in _WORKING:
        if disk.out_of_space(e, sdir.tmp):
            done = disk.discard(sdir.tmp, sdir.resumable) if runtime.is_rank0() else \
                "rank 0 removes the unfinished work"
            raise disk.NoSpace(f"no space left on {disk.device(sdir.tmp)} while writing "
                               f"{disk.os_path_of(e) or sdir.tmp}: {done}; free some space and "
                               "rerun, or choose another run.dir") from e


def lock_folder(out: Path, what: str) -> None:
    """Rank 0: an exclusive flock on `.<out>.lock` beside `out` (held until `release_locks`),
    or an error naming its holder."""
    if runtime.rank() != 0 or str(out) in _HELD:
        return
    path = out.with_name(f".{out.name}.lock")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise NotAllowed(f"cannot write {out}: {e.strerror} ({disk.device(out.parent)}); "
                         "choose another run.dir or output folder") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise BadState(
            f"{out} is being written by another run ({holder}; lock {path}); wait for it to "
            "finish, or stop it, before running this stage on the same folder") from None
    except OSError as e:  # a filesystem without locks: Lustre -o noflock, NFS -o nolock
        if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        logging.getLogger("recipes.stage").warning(
            "%s is not locked: its filesystem, %s, refuses file locks (%s); do not run two "
            "stages on the same folder at once (Lustre takes them mounted with -o flock)", out,
            disk.device(out.parent), e.strerror)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{what}: pid {os.getpid()} on {socket.gethostname()} since "
                  f"{_iso(time.time())}\n".encode(), 0)
    _HELD[str(out)] = fd


def release_locks() -> None:
    """Release every stage lock this process holds (commit, a skipped stage, stage exit)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


def _refuse_overlap(out: Path, inputs: dict) -> None:
    """A folder input may not be, contain or hold the output; a file input may not be the output
    or lie inside it."""
    o = out.resolve()
    for role, v in inputs.items():
        for p in ([v] if isinstance(v, (str, Path)) else v):
            p = Path(p).resolve()
            how = "is" if o == p else "contains" if o in p.parents else \
                "lies inside" if p.is_dir() and p in o.parents else None
            if how:
                raise Refusal(f"the output {out} {how} the input {role} ({p}); a stage "
                              "never writes into its input: choose another output folder")


def differences(mark: Path, resumable: dict) -> str:
    """What differs between an unfinished run's `run.json` and `resumable` ('' if nothing; a
    field added since, at its earlier-results value, is no difference)."""
    prev = config.without_added(json.loads(mark.read_text()))
    return ", ".join(f"{k}: {short(prev.get(k))} -> {short(v)}"
                     for k, v in config.without_added(resumable).items()
                     if prev.get(k) != v)


def short(v, width: int = 120) -> str:
    """repr(v), cut to `width` characters for an error message."""
    text = repr(v)
    return text if len(text) < width else text[:width - 3] + "..."


def main(run, stage: str, doc: str, argv: list[str] | None = None, also: tuple = (),
         one_process: bool = False) -> int:
    """Every stage's entry point: parse `--config` + overrides for `stage`, log on rank 0,
    `run(cfg)`. `one_process`: the stage refuses a world of several ranks (torchrun, NPROC),
    where each would write the same folder. Exit 0 when finished, EXIT_PREEMPTED when it saved and stopped on a signal (a
    scheduler requeues; the rerun resumes). As a process of its own (argv None) a refusal of bad
    input is one line on stderr and exit EXIT_REFUSED (`cli`); called with argv (tests, Python
    callers) it raises."""
    def go() -> int:
        cfg = config.parse_args(argv, stage, doc, also)
        runtime.setup_logging(cfg.run.log_level)
        if (why := runtime.launch_problem()) is not None:  # before any lock or folder
            raise Refusal(why)
        if one_process and int(os.environ.get("WORLD_SIZE") or 1) > 1:
            raise Refusal(f"{stage} runs as one process, not {os.environ['WORLD_SIZE']} "
                          "(torchrun, NPROC): each would write the same folder; run it "
                          f"without them (make {stage}, or make all, which does)")
        try:
            run(cfg)
        except Preempted as e:
            logging.getLogger(f"recipes.{stage}").warning("stopped: %s", e)
            return EXIT_PREEMPTED
        except BaseException as e:  # torch's CheckpointException is a BaseException
            no_space(e)  # a full disk is named as such, and the half-written output removed
            raise
        finally:
            release_locks()
            _WORKING.clear()
        if argv is None:  # a process of its own: see ignore_late_signals
            ignore_late_signals()
        return 0

    return cli(go, stage) if argv is None else go()


EXIT_REFUSED = 2  # bad input, refused with a message that names the fix (as argparse exits)
def refusal(e: BaseException) -> str | None:
    """The message of a refusal of bad input (recipes.lib.errors.Refusal, config errors
    included), or None: anything else is a bug and keeps its traceback."""
    return str(e) if isinstance(e, Refusal) else None


def cli(fn, name: str) -> int:
    """`fn()` as a command: a refusal (`refusal`) prints `<name>: <message>` on stderr, no
    traceback, and exits EXIT_REFUSED; a bug raises with its traceback. run.log_level=DEBUG
    (on the command line, or in the recipe once it is read) shows the traceback of a refusal
    too."""
    try:
        return fn()
    except Exception as e:
        debug = any(a.lower() == "run.log_level=debug" for a in sys.argv) or \
            logging.getLogger().level == logging.DEBUG
        msg = None if debug else refusal(e)
        if msg is None:
            raise
        rank = f"[rank {runtime.rank()}] " if runtime.world_size() > 1 else ""
        print(f"{rank}{name}: {msg}", file=sys.stderr)
        return EXIT_REFUSED


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
