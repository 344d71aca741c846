import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_models import write_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "conf" / "tiny.yaml")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """{variant: folder} of tiny random HF Llama checkpoints, written once per session."""
    base = tmp_path_factory.mktemp("hf")
    return {v: write_tiny_llama(base / v, v) for v in ("gqa", "tied")}


def torchrun(module: str, *args: str, nproc: int = 2, timeout: int = 300):
    """Run `torchrun --nproc-per-node N -m module args` and fail with its output on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--standalone", "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    return p
