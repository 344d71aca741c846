"""Preemption: what a stage does when the scheduler wants its GPUs back, and the fault injection
the tests use to kill a stage at every place it can be hit.

SIGUSR1 (Slurm sends it `--signal` seconds before the time limit) or SIGTERM (preemption,
`scancel`) inside a training loop becomes a flag (`StopOnSignal`): every rank finishes its step,
the ranks agree on it, save a checkpoint there and raise `Preempted`; the stage's entry point
exits with EXIT_PREEMPTED (75) and a rerun resumes, so a preemption costs one step and one save.
Once a stage has committed its output, a late signal is ignored (`ignore_late_signals`).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import time

import torch
import torch.distributed as dist
from recipes.lib.errors import Refusal

log = logging.getLogger("recipes")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved and stopped on a signal; rerun the same command to resume
LATE_SIGNALS = ("SIGUSR1", "SIGTERM")


class Preempted(Exception):
    """A training stage saved a checkpoint and stopped on a signal (exit EXIT_PREEMPTED)."""


FAULT_ENV = "MINITRON_FAULT"  # the tests' channel; never a recipe or command-line setting


class Fault:
    """Fault injection for tests, from the environment (MINITRON_FAULT=KIND:STEP, inherited by
    torchrun's ranks and Slurm's jobs), never from a recipe; one call per place it can strike:
    kill_after (SIGKILL after step STEP), kill_in_save (SIGKILL once the checkpoint of STEP is
    written but before it is marked complete), signal_after (the last rank alone sends itself
    SIGUSR1 after step STEP), kill_in_finish (SIGKILL at point STEP of a training stage's finish,
    see train_stage); and step_ms (each step of a run started from scratch lasts at least STEP
    milliseconds, a resumed run goes at full speed: a test's slow first run that a time limit
    stops, the same on a fast machine and a slow one, then a quick rerun)."""

    KINDS = ("kill_after", "kill_in_save", "signal_after", "kill_in_finish", "step_ms")

    def __init__(self, spec: str | None = None):
        """`spec` (default: the environment's MINITRON_FAULT)."""
        spec = os.environ.get(FAULT_ENV) if spec is None else spec
        self.kind, self.step = None, None
        if spec:
            kind, _, step = spec.partition(":")
            if kind not in self.KINDS or not step.isdigit():
                raise Refusal(f"{FAULT_ENV}={spec!r}; use KIND:STEP with KIND one of "
                              f"{self.KINDS}")
            self.kind, self.step = kind, int(step)

    def at(self, kind: str, step: int) -> None:
        if self.kind != kind or self.step != step:
            return
        if kind == "signal_after":
            if dist.get_rank() == dist.get_world_size() - 1:
                os.kill(os.getpid(), signal.SIGUSR1)
        else:
            os.kill(os.getpid(), signal.SIGKILL)

    def pace(self, started: float, resumed: bool = False) -> None:
        """With step_ms:N, unless the run resumed, sleep out the rest of N ms since `started`
        (time.time())."""
        if self.kind == "step_ms" and not resumed:
            time.sleep(max(0.0, started + self.step / 1000 - time.time()))


class StopOnSignal:
    """`with StopOnSignal(names) as stop:` turns those signals into a flag (the handler only sets
    it; nothing runs inside a collective or a save). `stop.agreed()`, called by every rank at a
    step boundary, is True when any rank was signalled, so all ranks stop at the same step.
    `stop.check()` at each step boundary makes sure the signals still reach the handler. The
    previous handlers come back on exit."""

    def __init__(self, names: list):
        self.signals = [getattr(signal, n) for n in names]
        self.received: str | None = None
        self._old: dict = {}
        self._ours: dict = {}  # signal -> the handler address the kernel holds for it
        self._warned: set = set()  # what check() has said (once each: it may recur every step)

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        for s in self.signals:
            self._old[s] = signal.getsignal(s)
            if s in blocked:  # e.g. a launcher that ran us from inside a save: say so, then fix
                log.info("%s came blocked in the signal mask this process inherited: "
                         "unblocked", signal.Signals(s).name)
        self.arm()
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def arm(self) -> None:
        """Install the handlers and unblock the signals in this (the main) thread: a stage
        inherits the mask its launcher had (a blocked signal stays blocked across exec)."""
        for s in self.signals:
            signal.signal(s, self._handle)
            self._ours[s] = os_handler(s)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    def check(self) -> None:
        """Re-arm, with a warning naming what changed (once per cause), where a signal would no
        longer reach the handler: blocked in this thread, or its handler replaced, in Python or
        below it (a C library's sigaction, which signal.getsignal does not see). On the H200
        with Transformer Engine a SIGUSR1 after step 6 never reached the loop, the symptom of a
        blocked signal: a job would run into its time limit unsaved. (In the next session
        there, with this guard, nothing came blocked or replaced and the test passed: the first
        cause was not seen again.)"""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        wrong = [w for s in self.signals if (w := self._lost(s, blocked))]
        if wrong:
            said = "; ".join(wrong)
            (log.debug if said in self._warned else log.warning)(
                "%s since the stage started: restored (a preemption would not have been "
                "saved)", said)
            self._warned.add(said)
            self.arm()

    def _lost(self, s, blocked: set) -> str | None:
        """Why signal `s` would not reach the handler now (None: it would)."""
        name = signal.Signals(s).name
        if s in blocked:
            return f"{name} blocked"
        if (handler := signal.getsignal(s)) != self._handle:
            return f"{name} handled in Python by {handler!r}"
        if os_handler(s) != self._ours[s]:
            return f"{name} handled below Python by another handler"
        return None

    def agreed(self) -> bool:
        """Collective over the world group (one int): did any rank receive a signal? (No
        collective when no signal is watched: preempt_signals is the same on every rank.)"""
        if not self.signals or not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received is not None
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([int(self.received is not None)], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def os_handler(signum: int) -> int | None:
    """The address of the handler the kernel holds for `signum` (0 default, 1 ignore; POSIX
    sigaction, whose struct begins with it), None where libc cannot be asked."""
    try:
        libc = _libc()
        act = ctypes.create_string_buffer(256)  # struct sigaction is 152 bytes on Linux x86-64
        if libc.sigaction(signum, None, act) != 0:
            return None
        return ctypes.c_void_p.from_buffer(act).value or 0
    except (OSError, AttributeError):
        return None


def ignore_late_signals() -> None:
    """The stage's output is committed and the process only winds down (process groups,
    checkpoint writers, interpreter exit: seconds). Slurm's time-limit SIGUSR1 or a preemption
    SIGTERM arriving now has nothing left to save; with the default action it would kill the
    process and turn a finished stage into a failed job that the batch script does not requeue
    and whose dependants are cancelled. Seen on the real scheduler when a resumed run finished
    just before its USR1 (tests/stages/test_slurm.py)."""
    for name in LATE_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGUSR1 / SIGTERM while megatron writes a checkpoint. The helper processes it starts
    inherit the blocked mask: its async writer's multiprocessing Manager is a spawned interpreter
    whose default action for either signal is to die, and Slurm's signal reaches every process
    of the job step, so one arriving mid-save killed it ("EOFError" in the save: the job FAILED
    instead of being requeued; seen on the real scheduler, tests/stages/test_slurm.py). This
    process's handler (StopOnSignal) still gets the signal: once the save is done, or at once
    through another of its threads."""
    held = {getattr(signal, n) for n in LATE_SIGNALS}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
