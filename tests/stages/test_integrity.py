"""Nothing silently wrong, nothing lost: damaged inputs are refused naming the file, a changed
input is never silently reused, a stage folder is locked while written, a damaged checkpoint is
skipped, a kill at any point of a training stage's finish loses nothing, a stage never writes
into its input, nonsense values fail before work, a long document is tokenised in bounded
memory. Each test reproduces a case that corrupted or lost data before."""
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from recipes import data, distill, export, prune
from recipes.lib import tokens
from tests.conftest import ROOT, TINY
from tests.stages.test_bad_input import assert_nothing_written, broken_copy, run_convert
from tests.stages.test_distill import (  # noqa: F401  (module-scoped fixtures)
    args,
    assert_same_history,
    metrics,
    pruned,
    run_subprocess,
    start,
    straight,
)
from tests.tiny_models import write_tiny_llama


# ---- 1. damaged safetensors ------------------------------------------------------------------
def damage(victim, how):
    size = victim.stat().st_size
    if how == "truncate":
        os.truncate(victim, size // 2)
    elif how == "empty":
        victim.write_bytes(b"")
    elif how == "lfs":
        victim.write_text("version https://git-lfs.github.com/spec/v1\n"
                          "oid sha256:0123\nsize 1234\n")
    elif how == "flip":  # one byte in the middle
        raw = bytearray(victim.read_bytes())
        raw[size // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    elif how == "shape":  # a header whose shape disagrees with the bytes it spans
        raw = victim.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8: 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"][-1] -= 1
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= n
        victim.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n:])


@pytest.mark.parametrize("how, message", [
    ("truncate", r"is truncated: \d+ bytes, but tensor \S+ ends at byte \d+; re-download"),
    ("empty", r"is 0 bytes: empty or truncated; re-download"),
    ("lfs", r"is a Git-LFS pointer, not weights"),
    ("shape", r"tensor \S+ spans \d+ bytes, its shape \[.*\] and dtype F32 need \d+"),
])
def test_a_damaged_shard_is_refused_naming_it(hf_models, tmp_path, how, message):
    src = broken_copy(hf_models, tmp_path)
    victim = sorted(src.glob("model-*.safetensors"))[-1]
    damage(victim, how)
    with pytest.raises(ValueError, match=message) as e:
        run_convert(tmp_path, src)
    assert victim.name in str(e.value)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_weights_holding_nan_or_inf_are_refused_naming_the_tensor(hf_models, tmp_path, value):
    """A well-formed shard whose numbers are not (a diverged run's save, a bad dequantisation):
    convert fails naming the tensor instead of pruning on NaN importance; its unfinished
    folder stays hidden (.convert.tmp) and the next run starts it over."""
    src = broken_copy(hf_models, tmp_path)
    victim = sorted(src.glob("model-*.safetensors"))[-1]
    good = victim.read_bytes()
    raw = bytearray(good)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    name = next(k for k, h in header.items() if k != "__metadata__" and h["dtype"] == "F32")
    at = 8 + n + header[name]["data_offsets"][0] + 4 * 3  # its fourth value
    raw[at: at + 4] = struct.pack("<f", value)
    victim.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{victim.name}: tensor {name} holds 1 NaN / inf "
                                         r"value\(s\) of \d+: the checkpoint is damaged"):
        run_convert(tmp_path, src)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".convert.lock",
                                                                    ".convert.tmp"]
    victim.write_bytes(good)  # the re-download
    assert run_convert(tmp_path, src) == 0


# ---- 2. a changed input is refused, never silently reused ---------------------------------------
def test_replaced_weights_are_refused_then_redone_with_force(hf_models, tmp_path):
    src = broken_copy(hf_models, tmp_path, "tied")
    assert run_convert(tmp_path, src) == 0
    before = (tmp_path / "run" / "convert" / "manifest.json").read_text()
    other = write_tiny_llama(tmp_path / "other", "tied", seed=1)  # a "re-download"
    for f in other.glob("*.safetensors"):
        shutil.copy(f, src / f.name)
    with pytest.raises(FileExistsError, match=r"input changed since it was made .*: hf_path "
                                              r"\(model-.*run.force=true to redo"):
        run_convert(tmp_path, src)
    assert (tmp_path / "run" / "convert" / "manifest.json").read_text() == before
    assert run_convert(tmp_path, src, "run.force=true") == 0
    assert (tmp_path / "run" / "convert" / "manifest.json").read_text() != before


def test_hashes_catch_new_content_with_the_same_size_and_mtime(hf_models, tmp_path):
    src = broken_copy(hf_models, tmp_path, "tied")
    assert run_convert(tmp_path, src, "convert.hash_weights=true") == 0
    victim = sorted(src.glob("model-*.safetensors"))[0]
    st = victim.stat()
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF  # one weight byte
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_convert(tmp_path, src) == 0  # without hashes: size + mtime agree
    with pytest.raises(FileExistsError, match=f"input changed since.*{victim.name}"):
        run_convert(tmp_path, src, "convert.hash_weights=true")


def test_a_rerun_upstream_stage_invalidates_its_downstream_output(hf_models, tmp_path):
    src = hf_models["tied"]
    run = tmp_path / "run"
    assert run_convert(tmp_path, src) == 0
    assert export.main(["--config", TINY, f"run.dir={run}"]) == 0
    assert run_convert(tmp_path, src, "run.force=true") == 0
    with pytest.raises(FileExistsError, match=r"input changed since .*: input \(manifest.json "
                                              r"\(the stage was re-run\)\)"):
        export.main(["--config", TINY, f"run.dir={run}"])


# ---- 3. one run per stage folder ----------------------------------------------------------------
@pytest.mark.slow
def test_a_second_distill_on_a_folder_being_written_fails_at_once(pruned, tmp_path):  # noqa: F811
    out = tmp_path / "d"
    p, err = start(args(pruned, out, "distill.train_iters=400", "distill.eval_interval=400",
                        "distill.save_interval=400"))
    try:
        rows = out.parent / ".d.tmp" / "logs" / "metrics.jsonl"
        deadline = time.time() + 180
        while not (rows.is_file() and len(rows.read_text().splitlines()) >= 2):
            assert p.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.5)
        t0 = time.time()
        holder = f"distill: pid {p.pid} on {socket.gethostname()}"
        with pytest.raises(RuntimeError, match=f"is being written by another run \\({holder}"):
            distill.main(args(pruned, out))
        assert time.time() - t0 < 30  # before any model is built
        steps = [json.loads(x)["step"] for x in rows.read_text().splitlines()]
        assert steps == sorted(set(steps))  # one writer: no step twice
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        err.close()


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch,
                                                                  caplog):
    """Lustre mounted with noflock (ENOSYS) or NFS with nolock (ENOLCK): flock fails; the
    stage says its folder is not locked and runs (it failed with a bare OSError before)."""
    import errno

    from recipes.lib import stage as S

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(S.fcntl, "flock", no_locks)
    sdir = S.StageDir("convert", tmp_path / "convert", "fp", force=False)
    assert not sdir.already_done()
    (sdir.begin() / "weights").write_text("w")
    sdir.commit({})
    assert (tmp_path / "convert" / "weights").read_text() == "w"
    assert "convert is not locked: its filesystem, " in caplog.text
    assert "refuses file locks (Function not implemented)" in caplog.text


def test_data_refuses_a_locked_folder_and_writes_nothing(trained_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / ".data.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"data: pid 4242 on otherhost since 2026-11-29T00:00:00Z\n")
        with pytest.raises(RuntimeError, match="another run \\(data: pid 4242 on otherhost"):
            data.main(["--config", TINY, f"run.dir={run}", f"convert.hf_path={trained_run['hf']}",
                       f"data.input={trained_run['corpus']}"])
    finally:
        os.close(fd)
    assert not (run / "data").exists() and not (run / ".data.tmp").exists()


# ---- 4. a damaged checkpoint ------------------------------------------------------------------------
def largest_distcp(folder):
    return max(folder.glob("*.distcp"), key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_stage_checkpoint_is_refused_naming_the_file(hf_models, tmp_path, how):
    """A stage checkpoint is read against the size and CRC32 of each file recorded when it was
    written: a short file is refused before anything is built, a flipped byte before a tensor
    is read (it loaded before, and export's parity check passed: both models had it)."""
    run = tmp_path / "run"
    assert run_convert(tmp_path, hf_models["tied"]) == 0
    victim = largest_distcp(run / "convert" / "iter_0000000")
    damage(victim, how)
    what = "is .* bytes, .* were written" if how == "truncate" else "has checksum"
    with pytest.raises(ValueError, match=f"iter_0000000 is damaged: {victim.name} {what}.*"
                                         "restore the folder, or rerun the stage"):
        export.main(["--config", TINY, f"run.dir={run}", f"export.output={tmp_path / 'hf'}"])
    assert not (tmp_path / "hf").exists()  # nothing published


@pytest.mark.parametrize("how", ["truncate", "flip", "gone"])
def test_a_damaged_export_is_refused_by_evaluate(trained_run, tmp_path, how):
    """An export's manifest records each file's size and CRC32; evaluate checks them before
    scoring the model (it scored a damaged one before), and refuses a folder without weights
    before any work."""
    from recipes import evaluate

    common = ["--config", TINY, f"run.dir={trained_run['run']}",
              f"convert.hf_path={trained_run['hf']}"]
    hf = tmp_path / "hf"
    assert export.main([*common, f"export.input={trained_run['run'] / 'convert'}",
                        f"export.output={hf}"]) == 0
    victim = hf / "model-00001-of-00001.safetensors"
    if how == "gone":  # an interrupted copy, a download that left only config.json
        victim.unlink(), (hf / "model.safetensors.index.json").unlink()
    else:
        damage(victim, how)
    what = {"truncate": f"{hf} is damaged: {victim.name} is .* bytes, .* were written",
            "flip": f"{hf} is damaged: {victim.name} has checksum",
            "gone": f"evaluate.models.exported={hf} holds no weights"}[how]
    with pytest.raises((ValueError, FileNotFoundError), match=what):
        evaluate.main([*common, f"evaluate.output={tmp_path / 'ev'}",
                       f"evaluate.models={{exported: {hf}}}", "evaluate.reference=exported",
                       "evaluate.prompts=null", "evaluate.include=[exported]"])
    assert not (tmp_path / "ev").exists()


@pytest.mark.slow
def test_damaged_newest_checkpoints_are_reported_and_skipped(pruned, straight,  # noqa: F811
                                                            tmp_path):
    """A resume verifies the newest checkpoint before loading it: the newest, truncated, is set
    aside by its size, the one before, with a flipped byte, by its checksum; the run resumes
    from the one before those and gives the uninterrupted run's history."""
    out = tmp_path / "d"
    keep = ("distill.save_interval=2", "distill.keep_last=3")
    run_subprocess(args(pruned, out, *keep), rc=-9, fault="kill_after:7")
    ckpts = tmp_path / ".d.tmp" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000002", "iter_0000004",
                                                              "iter_0000006"]
    victims = {step: largest_distcp(ckpts / f"iter_000000{step}") for step in (6, 4)}
    damage(victims[6], "truncate")
    damage(victims[4], "flip")
    stderr = run_subprocess(args(pruned, out, *keep))
    assert f"iter_0000006 is damaged: {victims[6].name} is " in stderr  # ... bytes
    assert f"iter_0000004 is damaged: {victims[4].name} has checksum" in stderr
    assert "iter_0000002 (step 2)" in stderr
    assert_same_history(metrics(straight), metrics(out))


# ---- 5. a kill at any point of the finish --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("point", [1, 2, 3])
def test_a_kill_at_any_point_of_the_finish_loses_nothing(pruned, straight, tmp_path,  # noqa: F811
                                                         point):
    out = tmp_path / "d"
    run_subprocess(args(pruned, out), rc=-9, fault=f"kill_in_finish:{point}")
    if point < 3:  # not committed: the resume state is all there
        assert not out.exists()
        assert (tmp_path / ".d.tmp" / "checkpoints" / "iter_0000008").is_dir()
    else:  # committed; its resume state was not yet removed
        assert (out / "manifest.json").is_file() and (out / "checkpoints").is_dir()
    stderr = run_subprocess(args(pruned, out))
    if point < 3:
        assert "iter_0000008 (step 8)" in stderr  # not from step 0
    done = json.loads((out / "manifest.json").read_text())["metrics"]
    want = json.loads((straight / "manifest.json").read_text())["metrics"]
    for key in ("step", "kd_loss", "valid_kd_loss", "valid_lm_loss"):
        assert done[key] == pytest.approx(want[key], abs=1e-6), key
    assert (out / "iter_0000008" / "metadata.json").is_file()
    assert not (out / "checkpoints").exists() and not (out / "run.json").exists()


@pytest.mark.parametrize("kill", ["after manifest", "after aside", "after in place"])
def test_a_kill_inside_a_commit_is_finished_by_the_next_run(tmp_path, monkeypatch, kill):
    """`commit` writes the manifest (the commit point), moves the output it replaces aside, the
    new one in, then removes the old one. Killed after any of these, the next run on the folder
    finds the new output in place (never neither), no copy aside, and skips the stage."""
    from recipes.lib import stage as S

    out = tmp_path / "convert"

    def a_run(tag):
        sdir = S.StageDir("convert", out, "fp", force=True)
        assert not sdir.already_done()
        (sdir.begin() / "weights").write_text(tag)
        sdir.commit({"tag": tag})

    a_run("old")
    real, renames = os.replace, []

    def replace(a, b):  # the rename that makes `kill` true, then the process dies
        real(a, b)
        renames.append(b)
        if len(renames) == ["after manifest", "after aside", "after in place"].index(kill) + 1:
            raise SystemExit("killed")

    monkeypatch.setattr(S.os, "replace", replace)
    with pytest.raises(SystemExit):
        a_run("new")
    monkeypatch.undo()
    S.release_locks(), S._WORKING.clear()  # what the dead process's exit does
    if kill == "after aside":
        assert not out.exists()  # the window: only the next run can show an output
    assert S.StageDir("convert", out, "fp", force=False).already_done()
    assert json.loads((out / "manifest.json").read_text())["tag"] == "new"
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".convert.lock", "convert"]


# ---- 6. a stage never writes into its input --------------------------------------------------------
def test_export_into_its_own_input_is_refused_even_with_force(hf_models, tmp_path):
    run = tmp_path / "run"
    assert run_convert(tmp_path, hf_models["tied"]) == 0
    before = sorted(p.name for p in (run / "convert").rglob("*"))
    for output, how in ((run / "convert", "is"), (run / "convert" / "hf", "lies inside"),
                        (run, "contains")):
        with pytest.raises(ValueError, match=f"the output {output} {how} the input input"):
            export.main(["--config", TINY, f"run.dir={run}", f"export.output={output}",
                         "run.force=true"])
    assert sorted(p.name for p in (run / "convert").rglob("*")) == before
    assert (run / "convert" / "iter_0000000" / "metadata.json").is_file()


def test_force_replaces_only_the_stage_own_output(hf_models, tmp_path):
    run = tmp_path / "run"
    assert run_convert(tmp_path, hf_models["tied"]) == 0
    assert run_convert(tmp_path, hf_models["tied"], f"convert.output={run / 'other'}") == 0
    with pytest.raises(FileExistsError, match="holds the output of stage 'convert', not "
                                              "'export'; run.force=true replaces only"):
        export.main(["--config", TINY, f"run.dir={run}", f"export.output={run / 'other'}",
                     "run.force=true"])
    assert json.loads((run / "other" / "manifest.json").read_text())["stage"] == "convert"


# ---- 7. nonsense values fail before work, naming key and fix --------------------------------------
def test_nonsense_values_are_refused_before_work(pruned, tmp_path):  # noqa: F811
    run, hf = pruned["run"], pruned["hf"]
    base = ["--config", TINY, f"run.dir={run}", f"convert.hf_path={hf}"]
    cases = [
        (prune.main, [f"prune.output={tmp_path}/p", "prune.ffn_hidden_size=0"],
         "prune.ffn_hidden_size=0 must be between 1 and the teacher's 96"),
        (prune.main, [f"prune.output={tmp_path}/p", "prune.num_layers=0"],
         "prune.num_layers=0 must be between 1 and the teacher's 4"),
        (prune.main, [f"prune.output={tmp_path}/p", "parallel.tp=1.9"],
         "parallel.tp=1.9 is not a valid int"),
        (distill.main, [f"distill.output={tmp_path}/d", "distill.train_iters=2.7"],
         "distill.train_iters=2.7 is not a valid int"),
        (distill.main, [f"distill.output={tmp_path}/d", "distill.data_weights=[-1]"],
         r"data_weights=\[-1\]: \[-1\] are not positive numbers"),
        (distill.main, [f"distill.output={tmp_path}/d", f"distill.data=[{run}/convert]"],
         "is a 'convert' stage output; this needs the output of data"),
        (distill.main, [f"distill.output={tmp_path}/d", f"distill.teacher={run}/data"],
         "is a 'data' stage output; this needs the output of convert"),
        (distill.main, [f"distill.output={tmp_path}/d", "run.log_level=verbose"],
         "run.log_level='verbose'; use one of"),
        (distill.main, [f"distill.output={tmp_path}/d", "distill.recompute_layers=-1"],
         "recompute_layers=-1 must be >= 0"),
    ]
    for main, extra, message in cases:
        with pytest.raises(ValueError, match=message):
            main([*base, *extra])
    assert not any(tmp_path.iterdir())


def test_data_from_another_tokenizer_is_refused_by_its_readers(pruned, hf_models,  # noqa: F811
                                                               tmp_path):
    other = tmp_path / "other_data"
    data.main(["--config", TINY, f"run.dir={tmp_path}", f"data.output={other}",
               f"data.input={pruned['corpus']}", f"data.tokenizer={hf_models['tied']}"])
    for main, key in ((distill.main, "distill.data"), (prune.main, "prune.data")):
        value = f"[{other}]" if key == "distill.data" else str(other)
        section = key.split(".")[0]
        with pytest.raises(ValueError, match=f"{key}={other} was tokenised with .*vocab_size "
                                             "512.*the model has vocab_size 1001: re-run"):
            main(["--config", TINY, f"run.dir={pruned['run']}", f"convert.hf_path={pruned['hf']}",
                  f"{key}={value}", f"{section}.output={tmp_path / section}"])


@pytest.mark.parametrize("line, message", [
    ({"text": None}, "'text' is NoneType None, not a string"),
    ({"text": 12345}, "'text' is int 12345, not a string"),
])
def test_jsonl_text_must_be_a_string(hf_models, tmp_path, line, message):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "docs.jsonl").write_text(json.dumps({"text": "abc"}) + "\n" + json.dumps(line))
    with pytest.raises(ValueError, match=f"docs.jsonl:2: {message}"):
        data.main(["--config", TINY, f"run.dir={tmp_path / 'run'}", f"data.input={corpus}",
                   f"data.tokenizer={hf_models['tied']}"])
    assert not (tmp_path / "run" / "data").exists()


def test_a_config_json_missing_a_field_is_named(hf_models, tmp_path):
    src = broken_copy(hf_models, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["intermediate_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json lacks \['intermediate_size'\]"):
        run_convert(tmp_path, src)
    assert_nothing_written(tmp_path)


# ---- 8. memory does not grow with the document -----------------------------------------------------
@pytest.mark.slow
def test_a_long_document_is_tokenised_in_bounded_memory(hf_models, tmp_path):
    """An 8 MB single-document .txt: peak RSS of the stage and its tokeniser workers stays
    bounded (~1 GB here; it grew ~400 bytes per character before: 3.2 GB more), and the tokens
    equal the whole document's, one EOD at its end."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    line = "abcdefghijklmnopqrstuvwxyz0123456789 ABCDEFGHIJ\n"
    big = line * (8_000_000 // len(line))
    (corpus / "big.txt").write_text(big)
    (corpus / "a.txt").write_text("small one")
    (corpus / "b.txt").write_text("small two")
    wrapper = ("import resource, subprocess, sys\n"
               "rc = subprocess.run(sys.argv[1:]).returncode\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "sys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "recipes.data",
                        "--config", TINY, f"run.dir={tmp_path / 'run'}", f"data.input={corpus}",
                        f"data.tokenizer={hf_models['tied']}", "data.workers=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    peak_mb = int(p.stdout.split()[-1]) / 1024
    assert peak_mb < 1500, f"peak RSS {peak_mb:.0f} MB for an 8 MB document"
    m = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    split = max(m["tokens"], key=m["tokens"].get)
    got = np.asarray(tokens.split_tokens(tmp_path / "run" / "data", split))
    # the tiny tokenizer: one token per character, '!'..'z' -> 3.., ' ' 93, newline 94
    chars = np.frombuffer(big.encode(), dtype=np.uint8).astype(np.int64)
    want = np.where((chars >= 33) & (chars < 33 + 90), chars - 30,
                    np.where(chars == 32, 93, np.where(chars == 10, 94, 0)))
    assert len(got) == len(big) + 1 and got[-1] == 2  # EOD once, at the end
    assert np.array_equal(got[:-1], want)


# ---- also: the export is a plain Llama ----------------------------------------------------------
def test_remote_code_pointers_are_not_exported(hf_models, tmp_path):
    """Nor a source's storage format: the export writes dense weights (a stale GGUF
    quantization_config made lm-eval look for a .gguf file)."""
    src = broken_copy(hf_models, tmp_path, "tied")
    for name in ("config.json", "tokenizer_config.json"):
        cfg = json.loads((src / name).read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model", "AutoTokenizer": "evil.Tok"}
        (src / name).write_text(json.dumps(cfg))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    (src / "config.json").write_text(json.dumps(cfg))
    assert run_convert(tmp_path, src) == 0
    assert export.main(["--config", TINY, f"run.dir={tmp_path / 'run'}"]) == 0
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((tmp_path / "run" / "export" / name).read_text())
    assert "quantization_config" not in json.loads(
        (tmp_path / "run" / "export" / "config.json").read_text())


def test_a_folder_from_before_input_signatures_is_reused_with_a_warning(hf_models, tmp_path,
                                                                          capfd):
    assert run_convert(tmp_path, hf_models["tied"]) == 0
    mf = tmp_path / "run" / "convert" / "manifest.json"
    m = json.loads(mf.read_text())
    del m["input_signature"]  # as the previous version wrote it
    mf.write_text(json.dumps(m))
    assert run_convert(tmp_path, hf_models["tied"]) == 0
    assert json.loads(mf.read_text()) == m  # skipped, untouched
    assert "older version that did not record its inputs" in capfd.readouterr().err
