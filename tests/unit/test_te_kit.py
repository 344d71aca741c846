"""scripts/te_kit.py: the offline Transformer Engine kit is cut into parts that fit a transfer,
reassembled bit for bit, and refused naming a missing or damaged part, or a machine that differs
from the one it was built for, before anything is installed."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("te_kit", ROOT / "scripts" / "te_kit.py")
te_kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(te_kit)
BUILT_FOR = {"python": "3.12", "torch": "2.11.0+cu130", "cuda": "13.0", "arch": "90",
             "te": "2.20.2"}


@pytest.fixture
def kit(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for name, n in (("transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl", 7000),
                    ("transformer_engine-2.20.2-py3-none-any.whl", 900),
                    ("transformer_engine_torch-2.20.2.tar.gz", 300)):
        (src / name).write_bytes(os.urandom(n))
        files.append(src / name)
    m = te_kit.pack(files, tmp_path / "kit", BUILT_FOR, part_bytes=2048)
    return tmp_path / "kit", files, m


def test_parts_fit_and_reassemble_bit_for_bit(kit, tmp_path):
    folder, files, m = kit
    assert len(m["parts"]) >= 4 and all(p["bytes"] <= 2048 for p in m["parts"])
    assert all((folder / p["path"]).parent.name.startswith("part-") for p in m["parts"])
    out = te_kit.assemble(folder, tmp_path / "out")
    assert [f.read_bytes() for f in out] == [f.read_bytes() for f in files]
    assert json.loads((folder / "manifest.json").read_text())["built_for"] == BUILT_FOR
    assert te_kit.main(["verify", "--kit", str(folder)]) == 0
    assert te_kit.PART_BYTES <= 55 << 20  # one part per 64 MiB transfer, with the tree


def test_a_missing_or_damaged_part_is_named(kit, tmp_path):
    folder, _, m = kit
    victim = folder / m["parts"][1]["path"]
    data = victim.read_bytes()
    victim.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    with pytest.raises(te_kit.KitError, match=r"part part-01/kit.tar.01 is damaged"):
        te_kit.assemble(folder, tmp_path / "a")
    victim.unlink()
    with pytest.raises(te_kit.KitError, match=r"part part-01/kit.tar.01 is missing: carry "
                                              r"part-01/ too"):
        te_kit.assemble(folder, tmp_path / "b")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "te_kit.py"), "install", "--kit",
                        str(folder)], capture_output=True, text=True)
    assert p.returncode == 2 and "part-01/kit.tar.01 is missing" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_machine_that_differs_is_refused():
    te_kit.check_machine(BUILT_FOR, {"python": "3.12", "torch": "2.11.0+cu130", "cuda": "13.0",
                                     "arch": "90"})
    with pytest.raises(te_kit.KitError, match=r"torch 2.11.0\+cu130 \(kit\) vs 2.13.0 \(here\), "
                                              r"arch 90 \(kit\) vs None \(here\)"):
        te_kit.check_machine(BUILT_FOR, {"python": "3.12", "torch": "2.13.0", "cuda": "13.0",
                                         "arch": None})


def fake_python(tmp_path, imports_ok_after: int):
    """A `python` that logs each call and fails the import check until the given call."""
    log, count = tmp_path / "calls.log", tmp_path / "imports"
    exe = tmp_path / "python"
    exe.write_text(f"""#!/bin/bash
echo "$* NVTE_PYTORCH_FORCE_BUILD=$NVTE_PYTORCH_FORCE_BUILD" >> {log}
if [ "$1" = -c ]; then
  echo x >> {count}; [ "$(wc -l < {count})" -ge {imports_ok_after} ] && exit 0
  echo "ImportError: undefined symbol: _ZN3c10" >&2; exit 1
fi
""")
    exe.chmod(0o755)
    return str(exe), log


@pytest.mark.parametrize("case", ["prebuilt", "other torch", "does not import"])
def test_install_takes_the_prebuilt_extension_or_builds_it_and_says_why(tmp_path, monkeypatch,
                                                                        case):
    src = tmp_path / "src"
    src.mkdir()
    names = ["transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl",
             "transformer_engine-2.20.2-py3-none-any.whl", "transformer_engine_torch-2.20.2.tar.gz",
             "transformer_engine_torch-2.20.2-cp312-cp312-linux_x86_64.whl"]
    for n in names:
        (src / n).write_bytes(os.urandom(100))
    built_for = {**BUILT_FOR, "torch_git": "abc123"}
    te_kit.pack([src / n for n in names], tmp_path / "kit", built_for, part_bytes=150)
    here = {"python": "3.12", "torch": "2.11.0+cu130", "cuda": "13.0", "arch": "90",
            "torch_git": "def456" if case == "other torch" else "abc123"}
    monkeypatch.setattr(te_kit, "this_machine", lambda: here)
    python, log = fake_python(tmp_path, 2 if case == "does not import" else 1)
    how = te_kit.install(tmp_path / "kit", jobs=3, python=python)
    calls = log.read_text().splitlines()
    sdist_built = any(".tar.gz" in c and "NVTE_PYTORCH_FORCE_BUILD=TRUE" in c for c in calls)
    if case == "prebuilt":
        assert how == "prebuilt" and not sdist_built
        assert any("cp312-cp312-linux_x86_64.whl" in c for c in calls)
    elif case == "other torch":
        assert how == "built here (torch here is commit def456, the extension was built for " \
                      "abc123)" and sdist_built
        assert not any("cp312-cp312-linux_x86_64.whl" in c for c in calls)
    else:
        assert how.startswith("built here (the prebuilt extension does not import here "
                              "(ImportError: undefined symbol") and sdist_built


def test_the_build_finds_a_working_python_and_the_headers_the_compile_needs(tmp_path,
                                                                          monkeypatch):
    """A pyenv shim of a version not selected (exit 127) is passed over for pyenv's own
    interpreter; the build environment never tries GitHub and puts CCCL (nv/target) on the C++
    include path."""
    shim_dir = tmp_path / "shims"
    shim_dir.mkdir()
    (shim_dir / "python3.12").write_text("#!/bin/sh\nexit 127\n")
    real = tmp_path / "home" / ".pyenv" / "versions" / "3.12.4" / "bin" / "python"
    real.parent.mkdir(parents=True)
    real.write_text("#!/bin/sh\necho 3.12\n")
    for f in (shim_dir / "python3.12", real):
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim_dir}:/usr/bin:/bin")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert te_kit.find_python("3.12") == str(real)
    with pytest.raises(te_kit.KitError, match="no Python 3.9 here"):
        te_kit.find_python("3.9")
    cccl = tmp_path / "site" / "nvidia" / "cu13" / "include" / "cccl"
    cccl.mkdir(parents=True)
    env = te_kit.build_env(tmp_path / "site", "90", 7)
    assert env["NVTE_PYTORCH_FORCE_BUILD"] == "TRUE" and env["NVTE_BUILD_USE_NVIDIA_WHEELS"] == "1"
    assert env["NVTE_CUDA_ARCHS"] == "90" and env["MAX_JOBS"] == "7"
    assert str(cccl) in env["CPLUS_INCLUDE_PATH"].split(os.pathsep)
