"""A student that was not pruned from the teacher (its own HF checkpoint, another config of the
family) whose vocabulary is padded differently, with the same tokenizer: distilled over the
shared entries, the KD loss equal to one computed on the unpadded logits; a student whose
tokenizer differs is refused naming the first differing token."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import convert, distill
from recipes.lib import runtime
from tests.conftest import TINY
from tests.tiny_models import write_tiny_llama


@pytest.fixture(scope="module")
def student(tmp_path_factory, trained_run):
    """A fresh tiny Llama of another shape with vocab 1100 (padded 1152; the teacher's 1001
    pads to 1024), the same character tokenizer, converted in its own run."""
    base = tmp_path_factory.mktemp("student")
    hf = write_tiny_llama(base / "hf", "gqa", seed=3, vocab_size=1100, num_hidden_layers=2,
                          hidden_size=48, head_dim=16)
    convert.main(["--config", TINY, f"run.dir={base / 'run'}", f"convert.hf_path={hf}"])
    return {"hf": hf, "convert": base / "run" / "convert"}


def kd_on_valid(teacher_hf, student_hf, run, columns, cache):
    """KL(teacher || student) per token over the first `columns` logits, averaged over the
    validation batches distill's loop reads, with transformers."""
    from recipes.lib import batches, train, train_config

    c = train_config.TrainConfig(input="-", data=[str(run / "data")], seq_length=64,
                                 global_batch_size=4, train_iters=2, warmup_iters=1, eval_iters=1)
    with runtime.distributed(1, 1):
        _, valid = batches.datasets(c, 1234, cache)
        val = batches.micro_batches(valid, 0, c, train.check_layout(c, 1))
    t = AutoModelForCausalLM.from_pretrained(teacher_hf, dtype=torch.float32).eval()
    s = AutoModelForCausalLM.from_pretrained(student_hf, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in val:
            lt = t(b["tokens"]).logits[..., :columns].float().log_softmax(-1)
            ls = s(b["tokens"]).logits[..., :columns].float().log_softmax(-1)
            total += ((lt.exp() * (lt - ls)).sum(-1) * b["loss_mask"]).sum().item()
            n += b["loss_mask"].sum().item()
    return total / n


def test_differently_padded_vocabularies_share_the_tokenizer(trained_run, student, tmp_path):
    run = trained_run["run"]
    out = tmp_path / "d"
    assert distill.main(["--config", TINY, f"run.dir={run}", f"distill.input={student['convert']}",
                         f"distill.teacher={run / 'convert'}", f"distill.output={out}",
                         "distill.train_iters=2", "distill.eval_interval=2"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["kd_vocab"] == 95 and m["arch"]["vocab_size"] == 1100  # the tokenizer's entries
    first = json.loads((out / "logs" / "metrics.jsonl").read_text().splitlines()[0])
    want = kd_on_valid(trained_run["hf"], student["hf"], run, 95, tmp_path / "cache")
    assert first["valid_kd_loss"] == pytest.approx(want, rel=1e-4)
    assert abs(kd_on_valid(trained_run["hf"], student["hf"], run, 1001, tmp_path / "c2")
               - want) > 1e-3  # the padded columns would change it


def test_a_student_with_another_tokenizer_is_refused(trained_run, student, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(student["convert"], other)
    tok = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    v = tok["model"]["vocab"]
    v["a"], v["b"] = v["b"], v["a"]  # another family's tokenizer: the same size, other ids
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    run = trained_run["run"]
    with pytest.raises(ValueError, match=r"tokenizers differ at id 67 \(student 'b', teacher "
                                         r"'a'\)"):
        distill.main(["--config", TINY, f"run.dir={run}", f"distill.input={other}",
                      f"distill.teacher={run / 'convert'}", f"distill.output={tmp_path / 'd'}"])
    assert not (tmp_path / "d").exists()
