"""A refusal of bad input, run as a command, is one clear line on stderr and exit code 2, with no
traceback (tracebacks are for bugs, and for run.log_level=DEBUG)."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow  # each case is a stage in a process of its own


def stage(module, *args):
    return subprocess.run([sys.executable, "-m", f"recipes.{module}", "--config", TINY, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def cases(tmp_path, hf):
    mlm = tmp_path / "mlm"  # a Megatron-LM root whose tracker names a missing iteration
    mlm.mkdir()
    (mlm / "latest_checkpointed_iteration.txt").write_text("50")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    run = f"run.dir={tmp_path / 'run'}"
    return [
        (("data", run, "data.inptu=x"), "data: unknown key(s) data.inptu; valid keys"),
        (("export", run, f"export.input={mlm}"), f"export: export.input: {mlm}"),
        (("data", run, f"data.input={corpus}", f"data.tokenizer={hf}"),
         f"data: {corpus / 'a.jsonl'}:2: not a JSON object"),
        (("convert", run, f"convert.hf_path={tmp_path / 'nowhere'}"), "convert: "),
        (("prune", run, "parallel.tp=2"), "prune: parallel.tp=2: ModelOpt Minitron pruning "
                                          "requires TP=1"),
    ]


def test_refusals_are_one_line_without_a_traceback(hf_models, tmp_path):
    for argv, message in cases(tmp_path, hf_models["gqa"]):
        p = stage(*argv)
        assert p.returncode == 2, (argv, p.stderr[-2000:])
        assert "Traceback" not in p.stderr, (argv, p.stderr[-2000:])
        assert p.stderr.strip().splitlines()[-1].startswith(message), (argv, p.stderr[-800:])
    left = [p.name for p in (tmp_path / "run").glob("*") if not p.name.endswith(".lock")]
    assert not left, left  # nothing written but the stage locks (flock files)


def test_debug_shows_the_traceback(tmp_path):
    p = stage("data", f"run.dir={tmp_path}", "data.inptu=x", "run.log_level=DEBUG")
    assert p.returncode != 0 and "Traceback" in p.stderr and "data.inptu" in p.stderr
