"""The pins resolve on the public package index alone, as a user's `make setup` sees it: no pip
configuration, no environment, no local wheel folder (uv's resolver with --no-config and an
explicit index; it reads package metadata only, no wheels). A pin that only a local folder
serves, like a `+cpu` local-version label, fails here. Needs the index: skipped offline."""
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPI = "https://pypi.org/simple"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
UV = Path(sys.executable).with_name("uv")
pytestmark = pytest.mark.slow


def answers(index: str, project: str) -> dict | None:
    """The index's JSON simple page of a project, or None where the index does not answer."""
    req = urllib.request.Request(f"{index}/{project}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return json.load(r)
    except OSError:
        return None


@pytest.fixture(scope="module")
def pypi():
    if answers(PYPI, "pip") is None:
        pytest.skip(f"{PYPI} does not answer (offline)")
    assert UV.is_file(), "uv is pinned in requirements.txt: make setup installs it"


def pins(path: Path) -> dict[str, str]:
    norm = lambda n: re.sub(r"[-_.]+", "-", n.lower())  # noqa: E731
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;#]+)", line)
        if m:
            out[norm(m[1])] = m[3]
    return out


def resolve(files: list[str], python: str, *extra: str) -> dict[str, str]:
    out = subprocess.run(
        [str(UV), "pip", "compile", "--no-config", "--quiet", "--no-header", "--no-annotate",
         "--index-url", PYPI, "--python-version", python,
         "--python-platform", "x86_64-manylinux_2_28", *extra, *files,
         "-c", "requirements.lock"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))},
             "UV_CACHE_DIR": str(ROOT / ".venv" / "uv-cache")})
    assert out.returncode == 0, f"does not resolve on {PYPI} for Python {python}:\n{out.stderr}"
    return pins_of(out.stdout)


def pins_of(text: str) -> dict[str, str]:
    return {re.sub(r"[-_.]+", "-", a.lower()): b for a, b in
            re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M)}


def test_no_pin_carries_a_local_version_label():
    for f in ("requirements.txt", "requirements.lock", "requirements-engine.txt",
              "requirements-gpu.txt"):
        labelled = {k: v for k, v in pins(ROOT / f).items() if "+" in v}
        assert not labelled, f"{f} pins {labelled}: no public index serves local versions"


@pytest.mark.parametrize("python", ["3.12", "3.11"])
def test_the_lock_resolves_on_the_public_index(pypi, python):
    """The CPU venv's packages (and, on Linux x86_64, PyPI's torch: the fallback where PyPI's
    CPU index is out of reach), at the lock's versions. megatron-core declares Python >= 3.12
    and is installed on 3.11 alone with --ignore-requires-python: there its cp311 wheel is
    looked up instead."""
    lock = pins(ROOT / "requirements.lock")
    files = ["requirements.txt"] + (["requirements-engine.txt"] if python == "3.12" else [])
    got = resolve(files, python)
    assert got["torch"] == lock["torch"]
    differ = {k: (v, lock[k]) for k, v in got.items() if k in lock and lock[k] != v}
    assert not differ, f"resolved != locked: {differ}"
    if python == "3.11":
        mc = lock["megatron-core"]
        files = [f["filename"] for f in answers(PYPI, "megatron-core")["files"]]
        assert any(f.startswith(f"megatron_core-{mc}-cp311") for f in files), files[-5:]


def test_the_cuda_venv_resolves_with_transformer_engine(pypi):
    """A CUDA venv: PyPI's torch (CUDA build, its nvidia-* wheels) and Transformer Engine's core
    wheel for that CUDA; TE's torch extension is an sdist compiled at install (present?)."""
    te = next(line.split()[0] for line in (ROOT / "requirements-gpu.txt").read_text()
              .splitlines() if line.startswith("transformer-engine"))
    core = te.replace("pytorch,", "")  # the extension's sdist would be built to read it
    req = ROOT / ".venv" / "te-core.txt"
    req.write_text(core + "\n")
    got = resolve(["requirements.txt", "requirements-engine.txt", str(req)], "3.12")
    version = te.split("==")[1]
    assert got["transformer-engine-cu13"] == version, sorted(got)
    cuda = {k for k in got if k.startswith("nvidia-") and k.endswith("-cu13")}
    assert "nvidia-cudnn-cu13" in cuda, sorted(got)  # the CUDA build of torch, with TE's CUDA
    sdists = [f["filename"] for f in answers(PYPI, "transformer-engine-torch")["files"]]
    assert f"transformer_engine_torch-{version}.tar.gz" in sdists


def test_the_cpu_build_is_on_pytorchs_cpu_index(pypi):
    """make setup TORCH=cpu takes torch from PyTorch's CPU index: the lock's version is there
    as a +cpu wheel for both Pythons."""
    page = answers(CPU_INDEX, "torch")
    if page is None:
        pytest.skip(f"{CPU_INDEX} does not answer from here (setup falls back to PyPI's build, "
                    "resolved above)")
    want = pins(ROOT / "requirements.lock")["torch"]
    names = [f["filename"] for f in page["files"]]
    for tag in ("cp312", "cp311"):
        assert any(n.startswith(f"torch-{want}+cpu-{tag}-") and "x86_64" in n for n in names)
