"""docker/Dockerfile: a pinned NVIDIA base, the project's pinned requirements, torch untouched;
`make <stage> LAUNCH=docker` and `make help`.
(No Docker engine or NVIDIA registry here; `make docker-build` builds it where they exist.)"""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_pins_its_base_and_runs_the_install_script():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/(nemo|pytorch):\d{2}\.\d{2}(-py3)?(@sha256:\w+)?", base)
    assert re.search(r"^RUN bash docker/install.sh$", text, re.M)
    pins = [ln for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln and not ln.startswith("#")]
    assert pins and all("==" in ln for ln in pins)


def test_the_install_keeps_the_image_torch(tmp_path):
    """docker/install.sh, run against a stand-in for the image's python (which records what pip
    is asked): the image's torch version is a constraint of every pinned install, no torch pin of
    ours reaches pip, and the engine (megatron-core, ModelOpt) installs without dependencies."""
    (tmp_path / "requirements.txt").write_text("torch==2.13.0\nomegaconf==2.3.0\n")
    (tmp_path / "requirements-engine.txt").write_text("megatron-core==0.19.2\n")
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -c ]; then echo "torch==2.9.0a0+nv25.09"; exit 0; fi
echo "$@" >> {log}
for f in "$@"; do [ -f "$f" ] && {{ echo "== $f"; cat "$f"; }} >> {log}; done
exit 0
""")
    fake.chmod(0o755)
    subprocess.run(["bash", str(ROOT / "docker" / "install.sh")], cwd=tmp_path, check=True,
                   env={**os.environ, "PYTHON": str(fake)})
    calls = log.read_text().split("-m pip install")[1:]
    assert len(calls) == 2
    pinned, engine = calls
    assert " -c " in pinned and "torch==2.9.0a0+nv25.09" in pinned  # the image's torch
    assert "omegaconf==2.3.0" in pinned and "torch==2.13.0" not in pinned
    assert "--no-deps" in engine and "megatron-core==0.19.2" in engine and " -c " not in engine


def test_make_stage_launch_docker_mounts_repo_and_data():
    import subprocess

    out = subprocess.run(["make", "-n", "distill", "LAUNCH=docker", "NPROC=8",
                          "MOUNTS=/models /lustre/data", "RECIPE=conf/llama31_8b_to_4b_width.yaml",
                          "ARGS=parallel.tp=8 run.dir=/lustre/runs/w"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("docker run")]
    assert len(line) == 1, out
    cmd = line[0]
    assert "--gpus all --ipc=host" in cmd
    assert f"-v {ROOT}:/workspace/minitron-recipes" in cmd
    assert "-v /models:/models -v /lustre/data:/lustre/data" in cmd
    assert "-e PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in cmd
    assert "-e TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600" in cmd
    assert cmd.endswith("minitron-recipes:latest torchrun --nproc-per-node 8 -m recipes.distill "
                        "--config conf/llama31_8b_to_4b_width.yaml parallel.tp=8 "
                        "run.dir=/lustre/runs/w")


def test_make_help_lists_every_stage_and_the_chain():
    import subprocess

    out = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    listed = {ln.split()[0] for ln in out.splitlines() if ln.strip()}
    stages = {"data", "convert", "teacher_correction", "prune", "distill", "export", "evaluate",
              "report", "plan"}
    assert stages | {"all", "demo", "test", "docker-build", "gpu-check"} <= listed, listed
