"""The data stage: token counts that match the tokenizer, a deterministic document split, and
clear errors for bad input."""
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from recipes import data
from recipes.lib import tokens
from tests.conftest import TINY
from tests.corpus import write_corpus


def run_data(tmp_path, corpus, tok, *extra):
    return data.main(["--config", TINY, f"run.dir={tmp_path / 'run'}", f"data.input={corpus}",
                      f"data.tokenizer={tok}", *extra])


def test_counts_split_and_contents(hf_models, tmp_path):
    corpus = write_corpus(tmp_path / "c", n_docs=40)
    run_data(tmp_path, corpus, hf_models["gqa"])
    m = json.loads((tmp_path / "run/data/manifest.json").read_text())
    assert sum(m["documents"].values()) == 41 and m["documents"]["valid"] >= 1
    tok = AutoTokenizer.from_pretrained(hf_models["gqa"])
    docs = [json.loads(line)["text"] for line in open(corpus / "docs.jsonl")]
    docs.append((corpus / "extra.txt").read_text())
    expected = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    assert sum(m["tokens"].values()) == expected  # every token plus one EOD per document
    for split in data.SPLITS:
        arr = tokens.split_tokens(tmp_path / "run/data", split)
        assert len(arr) == m["tokens"][split]
        assert (np.asarray(arr) == tok.eos_token_id).sum() == m["documents"][split]
    # deterministic: the same seed gives the same split, another seed another one
    run_data(tmp_path / "again", corpus, hf_models["gqa"])
    again = json.loads((tmp_path / "again/run/data/manifest.json").read_text())
    assert again["tokens"] == m["tokens"]
    run_data(tmp_path / "seed", corpus, hf_models["gqa"], "run.seed=7")
    other = json.loads((tmp_path / "seed/run/data/manifest.json").read_text())
    assert other["tokens"] != m["tokens"] and sum(other["tokens"].values()) == expected


def test_split_assignment_is_document_level_and_exact():
    a = data.split_assignment(100, [0.8, 0.1, 0.1], seed=3)
    assert (a == 1).sum() == 10 and (a == 2).sum() == 10
    assert np.array_equal(a, data.split_assignment(100, [0.8, 0.1, 0.1], seed=3))


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "holds no .txt / .jsonl / .jsonl.gz / .jsonl.zst / .parquet files"),
    (lambda d: (d.mkdir(), (d / "a.txt").write_text("   \n")), "no documents"),
    (lambda d: (d.mkdir(), (d / "a.txt").write_bytes(b"\xff\xfe\xfa")), "is not UTF-8"),
    # past the first block it is read while tokenised: named all the same
    (lambda d: (d.mkdir(), (d / "a.txt").write_bytes(b"x" * 300_000 + b"caf\xe9 x")),
     r"a.txt is not UTF-8 text \(invalid continuation byte, after character 262,144\): "
     "convert it"),
    (lambda d: (d.mkdir(), (d / "a.jsonl").write_text('{"body": "x"}\n')),
     "a.jsonl:1: no 'text' \\(or 'messages'\\) field; set data.text_field"),
])
def test_bad_input(hf_models, tmp_path, make, message):
    make(tmp_path / "in")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_data(tmp_path, tmp_path / "in", hf_models["gqa"])
    assert not (tmp_path / "run" / "data").exists()


def test_split_without_documents(hf_models, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("abc")
    (tmp_path / "in" / "b.txt").write_text("def")
    with pytest.raises(ValueError, match="split 'valid' got no documents"):
        run_data(tmp_path, tmp_path / "in", hf_models["gqa"])


def test_tokenizer_of_another_model(hf_models, tmp_path):
    corpus = write_corpus(tmp_path / "c", n_docs=10)
    small = tmp_path / "small"
    small.mkdir()
    for f in hf_models["gqa"].glob("tokenizer*"):
        (small / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((hf_models["gqa"] / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 2}))
    with pytest.raises(ValueError, match="does not match the teacher's vocab_size=2"):
        run_data(tmp_path, corpus, small)
