"""Data as real pipelines leave it: folders with what tools write beside the data (notebook
checkpoints, hidden copies, Spark/Hadoop markers and checksums), the same file twice, rows
that parse but are not text (a lone surrogate, a chat the template refuses), and legal
encodings that are not damage (zstd long windows and skippable frames, multi-member gzip)."""
import gzip
import json
import shutil
import struct

import pytest
import zstandard

from recipes import data
from tests.conftest import TINY

ROWS = [{"text": f"document number {i} " + "lorem ipsum dolor sit amet " * 8} for i in range(40)]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def run_data(tmp_path, corpus, tok, *extra, name="run"):
    data.main(["--config", TINY, f"run.dir={tmp_path / name}", f"data.input={corpus}",
               f"data.tokenizer={tok}", *extra])
    return json.loads((tmp_path / name / "data" / "manifest.json").read_text())


def test_what_tools_leave_beside_the_data_is_skipped_and_listed(hf_models, tmp_path):
    """A copy of the corpus in a notebook checkpoint or a hidden folder is not more documents
    (it would spread the same text over train and test); markers and checksums are not data."""
    corpus = tmp_path / "c"
    (corpus / ".ipynb_checkpoints").mkdir(parents=True)
    (corpus / ".cache" / "old").mkdir(parents=True)
    (corpus / "_temporary" / "0").mkdir(parents=True)
    (corpus / "part-00000.jsonl").write_bytes(jsonl(ROWS))
    shutil.copy(corpus / "part-00000.jsonl",
                corpus / ".ipynb_checkpoints" / "part-00000-checkpoint.jsonl")
    shutil.copy(corpus / "part-00000.jsonl", corpus / ".cache" / "old" / "copy.jsonl")
    shutil.copy(corpus / "part-00000.jsonl", corpus / "_temporary" / "0" / "part-00000.jsonl")
    (corpus / "_SUCCESS").write_bytes(b"")
    (corpus / ".part-00000.jsonl.crc").write_bytes(b"crc\x00\x01")
    (corpus / "part-00000.jsonl~").write_bytes(jsonl(ROWS[:3]))
    (corpus / "README.md").write_text("how this corpus was made\n")
    m = run_data(tmp_path, corpus, hf_models["gqa"])
    assert sum(m["documents"].values()) == len(ROWS)
    assert m["input"]["files"] == [str(corpus / "part-00000.jsonl")]
    skipped = m["input"]["skipped"]
    assert skipped["hidden, or a tool's marker"] == 6  # 3 copies, _SUCCESS, .crc, ~ backup
    assert skipped["not a data file"] == 1  # README.md


def test_the_same_file_twice_is_refused_or_counted(hf_models, tmp_path):
    corpus = tmp_path / "c"
    (corpus / "2024").mkdir(parents=True)
    (corpus / "a.jsonl").write_bytes(jsonl(ROWS))
    (corpus / "b.jsonl").write_bytes(jsonl(ROWS[:20]))
    (corpus / "2024" / "a-copy.jsonl").write_bytes(jsonl(ROWS))
    with pytest.raises(ValueError, match=r"c/a.jsonl has the same content as .*2024/a-copy.jsonl: "
                                         r"its documents would be published twice"):
        run_data(tmp_path, corpus, hf_models["gqa"])
    assert not (tmp_path / "run" / "data").exists()
    m = run_data(tmp_path, corpus, hf_models["gqa"], "data.on_duplicate_file=skip")
    assert sum(m["documents"].values()) == len(ROWS) + 20
    assert m["input"]["skipped"]["duplicate content"] == 1
    # the first in sorted order is read (2024/ before a.jsonl)
    assert m["input"]["duplicates"] == {
        str(corpus / "a.jsonl"): str(corpus / "2024" / "a-copy.jsonl")}


MISTRAL_LIKE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/"
                "assistant/...') }}{% endif %}[{{ m['role'] }}]:{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant]:{% endif %}")


def test_rows_that_parse_but_are_not_text_are_named_and_skippable(hf_models, tmp_path):
    """Valid JSON holding a lone surrogate; a chat the tokenizer's own template rejects (turns
    that do not alternate): `file:row: what`, or skipped and counted by kind."""
    tok = tmp_path / "tok"
    shutil.copytree(hf_models["gqa"], tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": MISTRAL_LIKE}))
    chat = [{"messages": [{"role": "user", "content": f"question {i} " * 5},
                          {"role": "assistant", "content": f"answer {i} " * 9}]}
            for i in range(30)]
    bad_chat = {"messages": [{"role": "user", "content": "one"},
                             {"role": "user", "content": "two"},
                             {"role": "assistant", "content": "three " * 9}]}
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "chat.jsonl").write_bytes(jsonl(chat[:10] + [bad_chat] + chat[10:]))
    with pytest.raises(ValueError, match=r"chat.jsonl:11: the chat template refuses it "
                                         r"\(TemplateError: Conversation roles must alternate"):
        run_data(tmp_path, corpus, tok)
    (corpus / "text.jsonl").write_bytes(
        b'{"text": "fine ' + b"x " * 40 + b'"}\n'
        b'{"text": "bad \\ud800 half a pair ' + b"y " * 40 + b'"}\n')
    (corpus / "chat.jsonl").write_bytes(jsonl(chat))
    with pytest.raises(ValueError, match=r"text.jsonl:2: a lone surrogate \\ud800 at character 4"):
        run_data(tmp_path, corpus, tok, name="surrogate")
    (corpus / "chat.jsonl").write_bytes(jsonl(chat[:10] + [bad_chat] + chat[10:]))
    m = run_data(tmp_path, corpus, tok, "data.on_bad_row=skip", name="skip")
    assert sum(m["documents"].values()) == 31
    assert m["skipped_kinds"] == {"chat template": 1, "lone surrogate": 1}
    assert m["skipped_rows"] == {str(corpus / "chat.jsonl"): 1, str(corpus / "text.jsonl"): 1}


def zstd_frames(raw: bytes) -> bytes:
    """A zstd stream as `zstd --long=30` writes one (a 1 GiB window, no content size), split into
    two frames with a skippable frame (as seekable-zstd writers add) between them."""
    params = zstandard.ZstdCompressionParameters(window_log=30, enable_ldm=True)
    half = len(raw) // 2
    out = b""
    for part in (raw[:half], raw[half:]):
        c = zstandard.ZstdCompressor(compression_params=params).compressobj()
        out += c.compress(part) + c.flush()
        if not out.endswith(b"skip"):
            out += struct.pack("<II", 0x184D2A50, 8) + b"metaskip"
    return out


def test_legal_encodings_are_read_not_called_damaged(hf_models, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    raw = jsonl(ROWS)
    (corpus / "a.jsonl.zst").write_bytes(zstd_frames(raw))
    cut = raw.index(b"\n", len(raw) // 2) + 1  # two gzip members, as `cat a.gz b.gz` makes
    (corpus / "b.jsonl.gz").write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]))
    m = run_data(tmp_path, corpus, hf_models["gqa"])
    assert sum(m["documents"].values()) == 2 * len(ROWS)
