"""Mistral, Qwen2 and Qwen3 through every stage, on tiny random models of each family (GQA,
head_dim != hidden/heads, odd vocab, Q/K/V biases, per-head Q/K norms, tied and untied
embeddings): logit parity with the family's own transformers class at TP=1, TP=2 and PP=2, exports
that `AutoModelForCausalLM` loads as that class, Minitron width + depth pruning through ModelOpt
with biases following their heads and Q/K norms intact, distillation that learns, teacher
correction, evaluation and the report."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import convert, data, distill, evaluate, export, prune, report, teacher_correction
from recipes.lib.arch import FAMILIES
from tests.conftest import TINY, torchrun
from tests.corpus import write_corpus
from tests.tiny_models import FAMILY_VARIANTS, state, write_tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("families")
    return {f: write_tiny_llama(base / f, f) for f in FAMILY_VARIANTS}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("fam_corpus"))


def common(run, hf):
    return ["--config", TINY, f"run.dir={run}", f"convert.hf_path={hf}"]


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def check_export(src_hf, out, family, exact=True):
    """The export loads as the family's own class with parity; with `exact`, its logits equal the
    source model's (a round trip with no pruning)."""
    m = manifest(out)
    assert m["metrics"]["parity_max_abs_diff"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == FAMILIES[family]["architectures"]
    assert model.config.model_type == family
    assert sum(p.numel() for p in model.parameters()) == m["num_params"]
    if exact:
        tokens = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(1))
        ref = AutoModelForCausalLM.from_pretrained(src_hf, dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (model(tokens).logits - ref(tokens).logits).abs().max().item()
        assert diff < 1e-4


def check_family_parts(family, teacher_hf, student_hf, kept):
    """Qwen2: each kept query head's bias is the teacher's bias of one head of the same group,
    and K/V biases are the teacher's; Qwen3: Q/K norm weights are the teacher's layer's."""
    t, s = state(teacher_hf), state(student_hf)
    cfg = json.loads((teacher_hf / "config.json").read_text())
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    groups, heads = cfg["num_key_value_heads"], cfg["num_attention_heads"]
    for i, j in enumerate(kept):  # student layer i holds teacher layer j
        a, b = f"model.layers.{i}.self_attn.", f"model.layers.{j}.self_attn."
        if family == "qwen2":
            for p in ("k", "v"):
                assert torch.equal(s[a + f"{p}_proj.bias"], t[b + f"{p}_proj.bias"])
            tq = t[b + "q_proj.bias"].view(groups, heads // groups, d)
            sq = s[a + "q_proj.bias"].view(groups, -1, d)
            for g in range(groups):
                for h in sq[g]:
                    assert any(torch.equal(h, x) for x in tq[g]), (i, g)
        if family == "qwen3":
            for p in ("q", "k"):
                assert torch.equal(s[a + f"{p}_norm.weight"], t[b + f"{p}_norm.weight"])


@pytest.mark.parametrize("family", FAMILY_VARIANTS)
def test_every_stage(family, models, corpus, tmp_path):
    hf, run = models[family], tmp_path / "run"
    a = common(run, hf)
    assert data.main([*a, f"data.input={corpus}"]) == 0
    assert convert.main(a) == 0
    assert convert.main([*a, "parallel.tp=1"]) == 0  # a rerun is skipped
    assert export.main([*a, f"export.output={run / 'export_teacher'}"]) == 0
    check_export(hf, run / "export_teacher", family)
    assert teacher_correction.main([*a, "teacher_correction.train_iters=2"]) == 0
    assert manifest(run / "teacher_correction")["arch"]["family"] == family

    assert prune.main([*a, "prune.num_layers=3"]) == 0  # tiny.yaml's width targets + depth
    pm = manifest(run / "prune")
    assert (pm["arch"]["hidden_size"], pm["arch"]["num_attention_heads"],
            pm["arch"]["num_layers"]) == (48, 2, 3)
    assert export.main([*a, f"export.input={run / 'prune'}",
                        f"export.output={run / 'export_pruned'}"]) == 0
    check_export(hf, run / "export_pruned", family, exact=False)
    dropped = pm["depth"]["hf_layers_dropped_0indexed"]
    check_family_parts(family, hf, run / "export_pruned", [j for j in range(4) if j not in dropped])

    assert distill.main([*a, "distill.train_iters=4", "distill.eval_interval=4"]) == 0
    rows = [json.loads(x) for x in (run / "distill" / "logs" / "metrics.jsonl").read_text()
            .splitlines()]
    assert rows[-1]["valid_kd_loss"] < rows[0]["valid_kd_loss"]  # it learns
    assert export.main([*a, f"export.input={run / 'distill'}"]) == 0
    check_export(hf, run / "export", family, exact=False)
    assert evaluate.main(a) == 0
    heldout = json.loads((run / "evaluate" / "results.json").read_text())["heldout"]
    assert set(heldout) == {"teacher", "pruned", "distilled"}  # random teachers: losses ~ln(V)
    assert heldout["distilled"]["params"] == pm["num_params"]
    assert report.main(a) == 0 and (run / "report" / "report.md").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_VARIANTS)
def test_tp2_round_trips(family, models, tmp_path):
    """TP=2 splits each family's own tensors (Q/K/V biases, Q/K norms)."""
    hf = models[family]
    tp = common(tmp_path / "tp", hf)
    torchrun("recipes.convert", *tp, "parallel.tp=2")
    assert export.main(tp) == 0  # TP2 -> TP1 on load
    check_export(hf, tmp_path / "tp" / "export", family)


@pytest.mark.slow
def test_pp2_round_trips_qwen2(models, tmp_path):
    """PP=2 places whole layers, and shares a tied embedding between the first and the last
    stage, alike for every family (test_convert_export.py: Llama, tied and untied): here for
    Qwen2 (Q/K/V biases, tied embeddings)."""
    hf = models["qwen2"]
    pp = common(tmp_path / "pp", hf)
    torchrun("recipes.convert", *pp, "parallel.pp=2")
    torchrun("recipes.export", *pp, "parallel.pp=2")
    check_export(hf, tmp_path / "pp" / "export", "qwen2")
