"""Data as users bring it: Parquet and compressed JSONL (the same tokens as plain JSONL, a
directory mixing them), bad rows refused or skipped and counted, damaged shards named; chat data
with a loss mask on the assistant turns; and a tokenizer that would drop or garble the text
refused before any work."""
import gzip
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from transformers import AutoTokenizer

from recipes import data
from recipes.lib import tokens
from tests.conftest import TINY
from tests.corpus import write_corpus

CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]:{% endif %}")


def run_data(tmp_path, corpus, tok, *extra, name="run"):
    data.main(["--config", TINY, f"run.dir={tmp_path / name}", f"data.input={corpus}",
               f"data.tokenizer={tok}", *extra])
    return json.loads((tmp_path / name / "data" / "manifest.json").read_text())


def split_arrays(folder):
    return {s: np.asarray(tokens.split_tokens(folder, s)) for s in data.SPLITS}


def texts(corpus):
    return [json.loads(line)["text"] for line in open(corpus / "docs.jsonl")]


def test_every_format_gives_the_same_tokens(hf_models, tmp_path):
    corpus = write_corpus(tmp_path / "c", n_docs=30)
    (corpus / "extra.txt").unlink()
    docs = texts(corpus)
    fmts = tmp_path / "formats"
    for name, write in (("gz", lambda p: gzip.open(p / "docs.jsonl.gz", "wt").write(
                            (corpus / "docs.jsonl").read_text())),
                        ("zst", lambda p: (p / "docs.jsonl.zst").write_bytes(
                            zstandard.ZstdCompressor().compress(
                                (corpus / "docs.jsonl").read_bytes()))),
                        ("parquet", lambda p: pq.write_table(pa.table({"text": docs}),
                                                             p / "docs.parquet",
                                                             row_group_size=7))):
        (fmts / name).mkdir(parents=True)
        write(fmts / name)
    plain = run_data(tmp_path, corpus, hf_models["gqa"], name="plain")
    want = split_arrays(tmp_path / "plain" / "data")
    for name in ("gz", "zst", "parquet"):
        m = run_data(tmp_path, fmts / name, hf_models["gqa"], name=name)
        assert m["tokens"] == plain["tokens"] and m["documents"] == plain["documents"], name
        got = split_arrays(tmp_path / name / "data")
        assert all(np.array_equal(got[s], want[s]) for s in data.SPLITS), name
    mixed = tmp_path / "mixed_input"  # a directory may mix formats: every document read once
    mixed.mkdir()
    shutil.copy(fmts / "parquet" / "docs.parquet", mixed)
    shutil.copy(fmts / "zst" / "docs.jsonl.zst", mixed)
    m = run_data(tmp_path, mixed, hf_models["gqa"], name="mixed")
    assert sum(m["documents"].values()) == 2 * len(docs)
    assert sum(m["tokens"].values()) == 2 * sum(plain["tokens"].values())


def test_bad_rows_are_refused_or_skipped_and_counted(hf_models, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    pq.write_table(pa.table({"text": ["abc", None, "defg", "hij"] * 5}), corpus / "a.parquet")
    with pytest.raises(ValueError, match=r"a.parquet:2: 'text' is null; fix or drop the row, or "
                                         "set data.on_bad_row=skip"):
        run_data(tmp_path, corpus, hf_models["gqa"])
    m = run_data(tmp_path, corpus, hf_models["gqa"], "data.on_bad_row=skip")
    assert m["skipped_rows"] == {str(corpus / "a.parquet"): 5}
    assert sum(m["documents"].values()) == 15
    # JSONL from a Windows editor (a byte order mark) with lines in latin-1
    rows = [b'{"text": "%s"}\n' % t for t in (b"abc", b"caf\xe9", b"defg", b"hij")] * 5
    (corpus / "a.parquet").unlink()
    (corpus / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(rows))
    with pytest.raises(ValueError, match=r"b.jsonl:2: not UTF-8 text \(invalid continuation byte "
                                         r"at byte 13\); fix or drop the row"):
        run_data(tmp_path, corpus, hf_models["gqa"], name="latin")
    m = run_data(tmp_path, corpus, hf_models["gqa"], "data.on_bad_row=skip", name="latin")
    assert m["skipped_rows"] == {str(corpus / "b.jsonl"): 5}
    assert sum(m["documents"].values()) == 15  # the first row too: the mark is not JSON
    for table, message in ((pa.table({"body": ["x"] * 3}), r"has no column 'text' \(columns: "
                                                           r"\['body'\]\); set data.text_field"),
                           (pa.table({"text": [1, 2, 3]}), r"a.parquet:1: 'text' is int 1, not "
                                                           "a string")):
        pq.write_table(table, corpus / "a.parquet")
        with pytest.raises(ValueError, match=message):
            run_data(tmp_path, corpus, hf_models["gqa"], name="bad")


@pytest.mark.parametrize("fmt, message", [
    ("parquet", "is not a readable Parquet file"),
    ("jsonl.gz", "is damaged after line"),
    ("jsonl.zst", "is damaged after line"),
])
def test_a_damaged_shard_is_named(hf_models, tmp_path, fmt, message):
    corpus = tmp_path / "c"
    corpus.mkdir()
    rows = [{"text": "abcdefghij" * 50} for _ in range(200)]
    path = corpus / f"a.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"text": [r["text"] for r in rows]}), path)
    else:
        raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(raw) if fmt.endswith("gz")
                         else zstandard.ZstdCompressor().compress(raw))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated download
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        run_data(tmp_path, corpus, hf_models["gqa"])
    assert not (tmp_path / "run" / "data").exists()


def chat_tokenizer(hf, dst):
    shutil.copytree(hf, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATE}))
    return dst


def test_chat_data_is_masked_to_the_assistant_turns(hf_models, tmp_path):
    corpus = tmp_path / "chat"
    corpus.mkdir()
    chats = [[{"role": "user", "content": "abc" * (i + 1)},
              {"role": "assistant", "content": "xyz" * (i + 2)},
              {"role": "user", "content": "def"}, {"role": "assistant", "content": "uvw"}]
             for i in range(30)]
    (corpus / "c.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    with pytest.raises(ValueError, match=f"the tokenizer {hf_models['gqa']} has no chat template"):
        run_data(tmp_path, corpus, hf_models["gqa"])
    tok_dir = chat_tokenizer(hf_models["gqa"], tmp_path / "tok")
    m = run_data(tmp_path, corpus, tok_dir, "data.split=1,0,0", name="chatrun")
    assert m["loss_mask"] and m["chats"] == 30
    out = tmp_path / "chatrun" / "data"
    ids = np.asarray(tokens.split_tokens(out, "train"))
    mask = np.asarray(np.memmap(out / "train_mask.bin", dtype=np.uint8, mode="r"))
    assert ids.shape == mask.shape
    tok = AutoTokenizer.from_pretrained(tok_dir)
    want_ids, want_mask, pos = [], [], 0
    order = sorted(range(30))  # one split: the documents in their order
    for i in order:  # independently: the rendered chat, 1 exactly on the assistant contents
        text, marks = "", []
        for msg in chats[i]:
            head = f"[{msg['role']}]:"
            text += head
            marks += [0] * len(head)
            text += msg["content"] + "\n"
            marks += [int(msg["role"] == "assistant")] * (len(msg["content"]) + 1)
        enc = tok(text, add_special_tokens=False)["input_ids"]
        assert len(enc) == len(text)  # one token per character
        want_ids += enc + [tok.eos_token_id]
        want_mask += marks + [0]
        pos += len(enc) + 1
    assert np.array_equal(ids, want_ids) and np.array_equal(mask, want_mask)


def bad_tokenizer(hf, dst, change):
    shutil.copytree(hf, dst)
    t = json.loads((dst / "tokenizer.json").read_text())
    change(t)
    (dst / "tokenizer.json").write_text(json.dumps(t))
    return dst


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "."},
                                       "behavior": "Removed", "invert": False}),
     "encodes text to no tokens"),
    (lambda t: t.update(normalizer={"type": "Lowercase"}), "does not give the text back"),
    (lambda t: t["model"]["vocab"].pop(" ") and t["model"]["vocab"].pop("e"),
     "maps .* of a sample's tokens to its unknown token"),
    (None, "tokenizer.json is empty \\(0 bytes\\)"),
])
def test_a_tokenizer_that_loses_the_text_is_refused_before_work(hf_models, tmp_path, change,
                                                                message):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": f"The {w} Reads Every Line."})
                                            + "\n" for w in ("quick", "slow", "odd") * 4))
    tok = tmp_path / "tok"
    if change is None:
        shutil.copytree(hf_models["gqa"], tok)
        (tok / "tokenizer.json").write_text("")
    else:
        bad_tokenizer(hf_models["gqa"], tok, change)
    with pytest.raises(ValueError, match=message):
        run_data(tmp_path, corpus, tok)
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "run" / ".data.tmp").exists()
