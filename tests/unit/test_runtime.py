"""How a stage process starts its world: alone (a world of one), or refused as one task of
an srun step of several."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

NO_BIND = """
import socket
def refuse(*args):
    raise OSError(98, "Address already in use")
socket.socket.bind = refuse
from recipes.lib import runtime
runtime.init(1, 1)
import torch.distributed as dist
print(dist.get_world_size(), dist.get_backend())
"""


def test_a_world_of_one_needs_no_port():
    """Its store lives in the process: no port to pick, none to bind (here every bind fails).
    A free port picked, then bound, raced on the H200: of 8 stages started at once, one failed
    with EADDRINUSE."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run([sys.executable, "-c", NO_BIND], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-2:] == ["1", "gloo"]


def test_a_several_task_srun_step_without_rank_is_refused():
    """`srun -n 2 python -m recipes.<stage>` gives each task a world of one: two whole runs on
    one GPU. Refused naming the launcher; the environments as read on the real scheduler (a
    batch script has SLURM_NTASKS but no SLURM_STEP_NUM_TASKS)."""
    from recipes.lib.runtime import launch_problem

    step = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0",
            "SLURM_STEP_NUM_TASKS": "2"}
    why = launch_problem(step)
    assert "task 1 of the 2 of an srun step" in why and "LAUNCH=slurm" in why
    assert launch_problem({**step, "RANK": "1", "WORLD_SIZE": "2"}) is None  # as our sbatch does
    assert launch_problem({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}) is None  # the batch script
    assert launch_problem({**step, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}) is None
    assert launch_problem({}) is None


def test_a_stage_in_such_a_step_stops_before_any_folder(monkeypatch, tmp_path):
    from recipes import convert
    from tests.conftest import TINY

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(ValueError, match="task 0 of the 2 of an srun step"):
        convert.main(["--config", TINY, f"run.dir={tmp_path / 'run'}",
                      f"convert.hf_path={tmp_path / 'hf'}"])
    assert not (tmp_path / "run").exists()
