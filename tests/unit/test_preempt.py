"""preempt.signals_deferred: a checkpoint writer's helper processes survive Slurm's signal, and
the signal still reaches the training loop's handler once the save is done."""
import multiprocessing as mp
import os
import signal
import time

from recipes.lib.preempt import StopOnSignal, signals_deferred


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
