"""docker/Dockerfile: a pinned NVIDIA base, the project's pinned requirements, torch untouched.
(No Docker engine or NVIDIA registry here; `make docker-build` builds it where they exist.)"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_pins_and_installs():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/(nemo|pytorch):\d{2}\.\d{2}(-py3)?(@sha256:\w+)?", base)
    assert "pip install --no-cache-dir -r /tmp/requirements.txt" in text
    assert "grep -v '^torch==' requirements.txt" in text  # keep the image's CUDA torch
    assert "--no-deps -r requirements-engine.txt" in text
    pins = [ln for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln and not ln.startswith("#")]
    assert pins and all("==" in ln for ln in pins)
    assert "megatron-core==0.19.2" in (ROOT / "requirements-engine.txt").read_text()
