"""docker/Dockerfile: a pinned NVIDIA base, the project's pinned requirements, torch untouched;
`make <stage> LAUNCH=docker` and `make help`.
(No Docker engine or NVIDIA registry here; `make docker-build` builds it where they exist.)"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_pins_and_installs():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/(nemo|pytorch):\d{2}\.\d{2}(-py3)?(@sha256:\w+)?", base)
    assert "pip install --no-cache-dir -c /tmp/image-constraints.txt -r /tmp/requirements.txt" \
        in text  # the image's torch is a constraint: a pin needing another torch fails the build
    assert "print(f'torch=={torch.__version__}')\" > /tmp/image-constraints.txt" in text
    assert "grep -v '^torch==' requirements.txt" in text  # keep the image's CUDA torch
    assert "--no-deps -r requirements-engine.txt" in text
    pins = [ln for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln and not ln.startswith("#")]
    assert pins and all("==" in ln for ln in pins)
    assert "megatron-core==0.19.2" in (ROOT / "requirements-engine.txt").read_text()


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
