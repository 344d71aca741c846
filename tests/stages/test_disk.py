"""Disk space: a stage refuses to start when its output cannot fit, and a write that fails on a
full disk anyway is named as such ("no space left on <device> while writing <path>") with the
unfinished work removed, on a real small filesystem (tmpfs; root only)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes import convert
from recipes.lib import disk
from tests.conftest import ROOT, TINY


class SmallDisk(type(Path())):
    def resize(self, n: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={n}", str(self)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A mounted tmpfs (`resize(bytes)` sets its size)."""
    mnt = SmallDisk(tmp_path / "small")
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                                            str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def run_convert(hf, run, *extra):
    return convert.main(["--config", TINY, f"run.dir={run}", f"convert.hf_path={hf}", *extra])


def test_a_stage_that_cannot_fit_is_refused_before_writing(hf_models, small_disk):
    small_disk.resize(512 << 10)  # the tiny model's fp32 checkpoint is ~1.1 MB
    with pytest.raises(disk.NoSpace, match=rf"stage convert needs about 1\.\d MB in "
                                           rf"{small_disk}/run, but its filesystem \(tmpfs "
                                           rf"\(mounted at {small_disk}\)\) has \d+\.\d KB free"):
        run_convert(hf_models["gqa"], small_disk / "run")
    assert not list((small_disk / "run").glob("convert*")) and \
        not (small_disk / "run" / ".convert.tmp").exists()


def test_a_full_disk_mid_write_is_named_and_cleaned_up(hf_models, small_disk, monkeypatch):
    """The size check is made to pass (as an estimate that fell short would): torch's writer
    then fails on the full filesystem, and the stage says so and removes its unfinished work."""
    small_disk.resize(768 << 10)
    monkeypatch.setattr(disk, "check", lambda *a, **k: None)
    with pytest.raises(disk.NoSpace, match=rf"no space left on tmpfs \(mounted at {small_disk}\) "
                                           rf"while writing {small_disk}/run/\.convert\.tmp.*the "
                                           "unfinished .* was removed"):
        run_convert(hf_models["gqa"], small_disk / "run")
    assert not (small_disk / "run" / ".convert.tmp").exists()
    assert disk.free_bytes(small_disk) > 700 << 10  # the disk is free again


def test_a_training_stage_keeps_its_complete_checkpoints(tmp_path):
    work = tmp_path / ".distill.tmp"
    (work / "checkpoints" / "iter_0000002").mkdir(parents=True)
    (work / "checkpoints" / "iter_0000002" / "train_state.json").write_text("{}")
    (work / "checkpoints" / ".iter_0000004.tmp").mkdir()
    (work / "logs").mkdir()
    (work / "logs" / ".metrics.jsonl.tmp123").write_text("x")
    said = disk.discard(work, resumable=True)
    assert (work / "checkpoints" / "iter_0000002" / "train_state.json").is_file()
    assert not (work / "checkpoints" / ".iter_0000004.tmp").exists()
    assert not (work / "logs" / ".metrics.jsonl.tmp123").exists()
    assert "kept and a rerun resumes from them" in said


def test_a_checkpoint_on_a_read_only_filesystem(hf_models, small_disk, tmp_path):
    """Read from a read-only filesystem as from any other; an output there is refused in one
    clean line naming the device (no traceback when run as a command)."""
    from recipes import export

    small_disk.resize(8 << 20)
    assert run_convert(hf_models["gqa"], small_disk / "run") == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert export.main(["--config", TINY, f"run.dir={tmp_path}",
                        f"export.input={small_disk / 'run' / 'convert'}"]) == 0
    assert (tmp_path / "export" / "manifest.json").is_file()
    p = subprocess.run([sys.executable, "-m", "recipes.export", "--config", TINY,
                        f"run.dir={small_disk / 'run2'}",
                        f"export.input={small_disk / 'run' / 'convert'}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        f"export: cannot write {small_disk / 'run2' / 'export'}: Read-only file system "
        f"(tmpfs (mounted at {small_disk})); choose another run.dir or output folder")
