"""runtime.init for a plain `python -m recipes.<stage>`: a world of one."""
import os
import subprocess
import sys

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
