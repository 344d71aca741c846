"""preempt.signals_deferred: a checkpoint writer's helper processes survive Slurm's signal, and
the signal still reaches the training loop's handler once the save is done; StopOnSignal.check
restores a handler that was replaced or a signal that was blocked."""
import faulthandler
import logging
import multiprocessing as mp
import os
import signal
import time

from recipes.lib.preempt import Fault, StopOnSignal, signals_deferred


def _sleep():
    time.sleep(30)


def spawned_child_survives_usr1(deferred: bool) -> bool:
    """Start a spawned interpreter (as megatron's writer starts its Manager), send it SIGUSR1 as
    Slurm does to every process of the step, and say whether it is still alive."""
    ctx = mp.get_context("spawn")
    with signals_deferred() if deferred else StopOnSignal([]):
        child = ctx.Process(target=_sleep, daemon=True)
        child.start()
    try:
        time.sleep(1.0)  # its interpreter up (a signal before that is fatal as well)
        os.kill(child.pid, signal.SIGUSR1)
        child.join(2.0)
        return child.is_alive()
    finally:
        child.kill()
        child.join()


def test_a_helper_process_started_in_a_save_survives_the_signal():
    assert not spawned_child_survives_usr1(deferred=False)  # what killed the save
    assert spawned_child_survives_usr1(deferred=True)


def test_a_signal_during_the_save_still_reaches_the_handler():
    """Held by the thread that writes (another thread of the process may take it at once: the
    handler only sets a flag); by the end of the save the loop knows."""
    with StopOnSignal(["SIGUSR1", "SIGTERM"]) as stop:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        time.sleep(0.1)
        assert stop.received == "SIGTERM"


def test_check_restores_a_replaced_handler_and_a_blocked_signal(caplog):
    """A C library's sigaction (faulthandler's here: Python's signal.getsignal still names our
    handler) and a blocked mask each keep a signal from the loop; check() names which and
    restores it, so the next signal is seen."""
    with StopOnSignal(["SIGUSR1", "SIGTERM"]) as stop, caplog.at_level(logging.WARNING):
        stop.check()
        assert not caplog.records  # nothing changed: silent
        faulthandler.register(signal.SIGUSR1, chain=False)  # dumps tracebacks, flag never set
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
        stop.check()
        assert "SIGUSR1 handled below Python by another handler" in caplog.text
        assert "SIGTERM blocked" in caplog.text
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert stop.received == "SIGUSR1"
        stop.received = None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop.received == "SIGTERM"
        caplog.clear()
        for _ in range(3):  # the same cause at every step: said once, restored each time
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
            stop.check()
            assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert caplog.text.count("SIGTERM blocked") == 1
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # replaced in Python
        caplog.clear()
        stop.check()
        assert "SIGUSR1 handled in Python by <Handlers.SIG_IGN" in caplog.text
        faulthandler.unregister(signal.SIGUSR1)


def test_a_paced_step_lasts_at_least_its_milliseconds():
    """MINITRON_FAULT=step_ms:N (the Slurm time-limit test's pace): a step that took less is
    padded to N ms; a longer one, a resumed run's, or no such fault, is not."""
    t0 = time.time()
    Fault("step_ms:80").pace(t0)
    assert time.time() - t0 >= 0.08
    for fault, started, resumed in ((Fault("step_ms:80"), time.time() - 1, False),
                                    (Fault("step_ms:80"), time.time(), True),
                                    (Fault(None), time.time(), False)):
        t1 = time.time()
        fault.pace(started, resumed)
        assert time.time() - t1 < 0.05
