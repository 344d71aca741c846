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
