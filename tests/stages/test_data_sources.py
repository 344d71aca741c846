"""Training data beyond our own text folders: chat data whose loss mask training honours
(a masked token contributes exactly nothing; the loss equals an independent computation), and
existing Megatron indexed datasets (prefixes) imported without copying, named directly in a
training stage, blended Megatron-LM style, and refused when they do not fit the model."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import data, distill, teacher_correction
from recipes.lib import megatron_data, runtime, tokens
from tests.conftest import TINY
from tests.stages.test_data_formats import chat_tokenizer


def chats(n=40):
    return [[{"role": "user", "content": "abcde" * (1 + i % 3)},
             {"role": "assistant", "content": "vwxyz" * (2 + i % 4)},
             {"role": "user", "content": "fgh"}, {"role": "assistant", "content": "stuv"}]
            for i in range(n)]


@pytest.fixture(scope="module")
def chat_data(trained_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("chat")
    (base / "in").mkdir()
    (base / "in" / "c.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n"
                                                 for m in chats()))
    tok = chat_tokenizer(trained_run["hf"], base / "tok")
    data.main(["--config", TINY, f"run.dir={base / 'run'}", f"data.input={base / 'in'}",
               f"data.tokenizer={tok}", "data.split=70,30,0"])
    return base / "run" / "data"


def masked_lm_loss(hf, batches, masked=True):
    """Mean next-token cross-entropy over the batches' loss_mask (or every token)."""
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    total, n = 0.0, 0.0
    with torch.no_grad():
        for b in batches:
            ce = torch.nn.functional.cross_entropy(
                model(b["tokens"]).logits.float().transpose(1, 2), b["labels"], reduction="none")
            mask = b["loss_mask"].float() if masked else torch.ones_like(ce)
            total, n = total + (ce * mask).sum().item(), n + mask.sum().item()
    return total / n


def test_training_honours_the_chat_loss_mask(trained_run, chat_data, tmp_path):
    """teacher_correction on chat data: its first validation LM loss is the masked mean an
    independent transformers computation gives on the same batches; the unmasked mean differs,
    so the mask decides; and every masked label is a user or template token."""
    from recipes.lib import batches, train, train_config

    run = trained_run["run"]
    out = tmp_path / "tc"
    assert teacher_correction.main([
        "--config", TINY, f"run.dir={run}", f"teacher_correction.data=[{chat_data}]",
        f"teacher_correction.output={out}", "teacher_correction.train_iters=2",
        "teacher_correction.eval_interval=2"]) == 0
    first = json.loads((out / "logs" / "metrics.jsonl").read_text().splitlines()[0])
    c = train_config.TrainConfig(input="-", data=[str(chat_data)], seq_length=64,
                                 global_batch_size=4, train_iters=2, warmup_iters=1, eval_iters=1)
    with runtime.distributed(1, 1):
        _, valid = batches.datasets(c, 1234, tmp_path / "cache")
        val = batches.micro_batches(valid, 0, c, train.check_layout(c, 1))
    mask = torch.cat([b["loss_mask"] for b in val])
    assert 0 < mask.mean() < 1  # both kinds of token in the validation batches
    want = masked_lm_loss(trained_run["hf"], val)
    assert first["valid_lm_loss"] == pytest.approx(want, rel=1e-4)
    assert abs(masked_lm_loss(trained_run["hf"], val, masked=False) - want) > 1e-2
    labels = torch.cat([b["labels"] for b in val])[mask > 0]
    assert set(labels.tolist()) <= set(range(3, 120))  # content and end-of-turn characters


def write_prefix(src_folder, prefix, split="train", vocab_cap=None):
    """A Megatron-LM style prefix (one .bin/.idx pair) holding a data folder's split."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    ds = IndexedDataset(str(src_folder / split))
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for i in range(len(ds)):
        doc = np.asarray(ds[i], dtype=np.int64)
        if vocab_cap is not None:
            doc = np.minimum(doc + vocab_cap, 65000)
        b.add_document(torch.from_numpy(doc), [len(doc)])
    b.finalize(f"{prefix}.idx")
    return prefix


def test_a_megatron_prefix_is_imported_without_copying(trained_run, tmp_path):
    run = trained_run["run"]
    prefix = write_prefix(run / "data", tmp_path / "corpus_text_document")
    m_out = tmp_path / "imp"
    data.main(["--config", TINY, f"run.dir={tmp_path}", f"data.input={prefix}",
               f"data.tokenizer={trained_run['hf']}", f"data.output={m_out}", "data.split=80,20,0"])
    m = json.loads((m_out / "manifest.json").read_text())
    assert m["import"]["copied"] is False and "the first train, then valid" in m["import"]["splits"]
    assert (m_out / "train.bin").is_symlink() and (m_out / "valid.bin").is_symlink()
    whole = np.asarray(tokens.split_tokens(run / "data", "train"))
    got = [np.asarray(tokens.split_tokens(m_out, s)) for s in ("train", "valid")]
    assert np.array_equal(np.concatenate(got), whole)  # the documents in order, none lost
    assert m["documents"]["valid"] == round(0.2 * sum(m["documents"].values()))
    # named directly in a training stage, and blended Megatron-LM style with a data folder
    out = tmp_path / "d"
    assert distill.main(["--config", TINY, f"run.dir={run}", f"distill.input={run / 'convert'}",
                         f"distill.output={out}", "distill.train_iters=2",
                         "distill.eval_interval=2", f"distill.data=[0.7, {prefix}, 0.3, "
                         f"{run / 'data'}]"]) == 0
    d = json.loads((out / "manifest.json").read_text())
    imported = run / "data_import"
    assert len(d["input"]["data"]) == 2 and str(imported) in d["input"]["data"][0]
    assert json.loads(next(imported.glob("*/manifest.json")).read_text())["import"]


def test_a_prefix_that_does_not_fit_the_model_is_refused(trained_run, tmp_path):
    run = trained_run["run"]
    big = write_prefix(run / "data", tmp_path / "other_text_document", vocab_cap=2000)
    args = ["--config", TINY, f"run.dir={tmp_path}", f"data.tokenizer={trained_run['hf']}"]
    with pytest.raises(ValueError, match="holds token id .* outside the model's vocabulary "
                                         r"\(1001\): it was tokenised for another model"):
        data.main([*args, f"data.input={big}"])
    cut = write_prefix(run / "data", tmp_path / "cut_text_document")
    with open(f"{cut}.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 10)
    with pytest.raises(ValueError, match=r"cut_text_document.bin is \d+ bytes, its .idx "
                                         r"describes \d+: a truncated or mismatched pair"):
        data.main([*args, f"data.input={cut}", f"data.output={tmp_path / 'o2'}"])


def test_a_run_directory_with_spaces(trained_run, tmp_path):
    """Every stage of the chain in a run directory whose path holds spaces (and the stage
    folders read back by the next stage)."""
    from recipes import convert, export, prune

    run = tmp_path / "my runs" / "week 1"
    common = ["--config", TINY, f"run.dir={run}", f"convert.hf_path={trained_run['hf']}"]
    data.main([*common, f"data.input={trained_run['corpus']}"])
    convert.main(common)
    prune.main([*common, "prune.num_layers=3"])
    distill.main([*common, "distill.train_iters=2", "distill.eval_interval=2"])
    assert export.main([*common, f"export.input={run / 'distill'}"]) == 0
    m = json.loads((run / "export" / "manifest.json").read_text())
    assert m["metrics"]["parity_max_abs_diff"] < 1e-4


def test_an_imported_prefix_is_checked_in_full(trained_run, tmp_path):
    """A cut or damaged .idx is named in one line (not megatron's traceback); a document of
    out-of-range ids between any sample's windows is found; a changed prefix is refused, and
    run.force=true imports it again."""
    import struct

    run = trained_run["run"]
    args = ["--config", TINY, f"run.dir={tmp_path}", f"data.tokenizer={trained_run['hf']}"]
    cut = write_prefix(run / "data", tmp_path / "cut_text_document")
    idx = Path(f"{cut}.idx")
    whole = idx.read_bytes()
    idx.write_bytes(whole[: len(whole) - 12])
    with pytest.raises(ValueError, match=r"cut_text_document.idx is \d+ bytes where its header's "
                                         r"\d+ sequences and \d+ documents need \d+: cut"):
        data.main([*args, f"data.input={cut}", f"data.output={tmp_path / 'o1'}"])
    idx.write_bytes(b"NOTANIDX!" + whole[9:])
    with pytest.raises(ValueError, match="is not a Megatron index"):
        data.main([*args, f"data.input={cut}", f"data.output={tmp_path / 'o1'}"])
    idx.write_bytes(whole[:9] + struct.pack("<Q", 2) + whole[17:])
    with pytest.raises(ValueError, match="has version 2 / dtype code"):
        data.main([*args, f"data.input={cut}", f"data.output={tmp_path / 'o1'}"])
    # one bad id in the middle of the .bin, far from where a sample of windows would look
    odd = write_prefix(run / "data", tmp_path / "odd_text_document")
    tok = np.memmap(f"{odd}.bin", dtype=np.uint16, mode="r+")
    where = len(tok) // 2 + 7
    tok[where] = 60000
    tok.flush()
    with pytest.raises(ValueError, match=rf"holds token id 60000 \(token {where:,}, document "
                                         r"[\d,]+\), outside the model's vocabulary \(1001\)"):
        data.main([*args, f"data.input={odd}", f"data.output={tmp_path / 'o2'}"])
    # imported by a training stage, changed, refused; run.force=true imports it again
    good = write_prefix(run / "data", tmp_path / "good_text_document")
    entries = megatron_data.as_folders([str(good)], tmp_path, 1001, 0, "distill.data")
    with open(f"{good}.bin", "r+b") as f:  # rewritten in place, one token changed
        f.seek(10)
        f.write(b"\x05\x00")
    os.utime(f"{good}.bin", (1, 1))
    with pytest.raises(ValueError, match=r"input changed since it was made .*run.force=true"):
        megatron_data.as_folders([str(good)], tmp_path, 1001, 0, "distill.data")
    again = megatron_data.as_folders([str(good)], tmp_path, 1001, 0, "distill.data", force=True)
    assert again == entries
    assert json.loads((Path(again[0]) / "manifest.json").read_text())["import"][
        "checked_tokens"] > 0


def test_windows_without_targets_contribute_nothing_and_are_counted(trained_run, tmp_path):
    """Prompts far longer than their answers: most 64-token windows hold no assistant token.
    Refused before work below min_loss_tokens, with the numbers and the fixes; allowed, such
    windows contribute nothing, are counted, and no loss is 0/0 (it was `lm_loss = nan`,
    reported as a diverged run)."""
    (tmp_path / "in").mkdir()
    long = [[{"role": "user", "content": "abcdefgh" * 40 + str(i)},
             {"role": "assistant", "content": "xy"}] for i in range(60)]
    (tmp_path / "in" / "c.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n"
                                                     for m in long))
    tok = chat_tokenizer(trained_run["hf"], tmp_path / "tok")
    data.main(["--config", TINY, f"run.dir={tmp_path / 'run'}", f"data.input={tmp_path / 'in'}",
               f"data.tokenizer={tok}", "data.split=70,30,0"])
    d = tmp_path / "run" / "data"
    m = json.loads((d / "manifest.json").read_text())
    assert 0 < m["loss_tokens"]["train"] < 0.01 * m["tokens"]["train"]
    mask = np.fromfile(d / "train_mask.bin", dtype=np.uint8)
    assert m["loss_tokens"]["train"] == int(mask.sum())
    run = trained_run["run"]
    args = ["--config", TINY, f"run.dir={run}", f"teacher_correction.data=[{d}]",
            f"teacher_correction.output={tmp_path / 'tc'}", "teacher_correction.train_iters=4",
            "teacher_correction.eval_interval=2", "teacher_correction.global_batch_size=16"]
    with pytest.raises(ValueError, match=r"only 0.\d\d% of the train split's tokens bear the "
                                         r"loss .* and \d+% of its 64-token windows none at all"
                                         r".*lower teacher_correction.min_loss_tokens=0.01"):
        teacher_correction.main(args)  # the default 1%
    assert not (tmp_path / "tc").exists()
    assert teacher_correction.main([*args, "teacher_correction.min_loss_tokens=0.005"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "tc" / "logs" / "metrics.jsonl").read_text()
            .splitlines()]
    assert all(0 < r["windows_without_targets"] < 16 for r in rows[1:])
    assert all(np.isfinite(r["lm_loss"]) for r in rows[1:])  # over the windows with targets
    assert all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
