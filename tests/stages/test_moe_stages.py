"""Mixtures of experts (Qwen3-MoE, Mixtral) through prune -> distill -> export, on tiny random
models the tests write: Minitron expert pruning keeps the experts ModelOpt ranks highest (whole,
with their router rows), width + expert + depth pruning exports to a model `transformers` loads
with the megatron model's logits, distillation from the MoE teacher learns with the router's
load-balancing loss weighted and logged, expert parallelism (EP=2) trains the EP=1 run, and a
run stopped at EP=2 resumes to the same losses."""
import json
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import (convert, data, distill, evaluate, export, prune, report,
                     teacher_correction)
from recipes.lib.arch import Arch
from recipes.lib.errors import Refusal
from recipes.lib.preempt import FAULT_ENV
from recipes.lib.targets import pruned_arch
from tests.conftest import TINY, torchrun
from tests.corpus import write_corpus
from tests.tiny_models import MOE_VARIANTS, state, write_tiny_llama

# experts kept by the expert-only prune (of 6 and of 3); the full prune's targets
KEEP = {"qwen3_moe": 4, "mixtral": 2, "qwen2_moe": 3}
FULL = ("prune.hidden_size=48", "prune.num_attention_heads=2", "prune.moe_ffn_hidden_size=32",
        "prune.num_layers=3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{family: (run dir, hf dir)}: each family's tiny model, its data and its conversion."""
    base = tmp_path_factory.mktemp("moe_stages")
    corpus = write_corpus(base / "corpus")
    out = {}
    for family in MOE_VARIANTS:
        hf, run = write_tiny_llama(base / family / "hf", family), base / family / "run"
        a = common(run, hf)
        assert data.main([*a, f"data.input={corpus}"]) == 0
        assert convert.main(a) == 0
        out[family] = (run, hf)
    return out


def common(run, hf, *extra):
    # tiny.yaml's dense FFN target does not apply: a mixture of experts has none
    return ["--config", TINY, f"run.dir={run}", f"convert.hf_path={hf}",
            "prune.ffn_hidden_size=null", *extra]


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def check_export(out):
    """The export loads in transformers with the megatron model's logits (the stage's parity)
    and the manifest's parameter count."""
    m = manifest(out)
    assert m["metrics"]["parity_max_abs_diff"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == m["num_params"]
    return m


def experts_of(sd, family, layer):
    """[(router row, gate, up, down)] of each expert of one HF layer."""
    if family == "mixtral":
        p = f"model.layers.{layer}.block_sparse_moe."
        names = ("w1", "w3", "w2")
    else:
        p = f"model.layers.{layer}.mlp."
        names = ("gate_proj", "up_proj", "down_proj")
    gate = sd[p + "gate.weight"]
    return [(gate[e], *(sd[p + f"experts.{e}.{n}.weight"] for n in names))
            for e in range(gate.shape[0])]


def values(t):
    return t.flatten().sort().values


@pytest.mark.parametrize("family", MOE_VARIANTS)
def test_expert_pruning_keeps_the_most_important_experts_whole(runs, family, tmp_path):
    run, hf = runs[family]
    out = tmp_path / "prune"
    assert prune.main(common(run, hf, f"prune.num_moe_experts={KEEP[family]}",
                             "prune.hidden_size=null", "prune.num_attention_heads=null",
                             f"prune.output={out}")) == 0
    m = manifest(out)
    assert m["arch"]["num_moe_experts"] == KEEP[family]
    assert m["arch"]["moe_router_topk"] == manifest(run / "convert")["arch"]["moe_router_topk"]
    scores = json.loads((out / "importance.json").read_text())["experts"]
    assert export.main(common(run, hf, f"export.input={out}",
                              f"export.output={tmp_path / 'hf'}")) == 0
    check_export(tmp_path / "hf")
    teacher, student = state(hf), state(tmp_path / "hf")
    for layer in range(4):
        t, s = experts_of(teacher, family, layer), experts_of(student, family, layer)
        kept = []
        for expert in s:  # each student expert is one teacher expert, router row included
            # (ModelOpt also reorders the channels and neurons it keeps: compare value sets)
            same = [j for j, te in enumerate(t) if all(torch.equal(values(a), values(b))
                                                       for a, b in zip(expert, te))]
            assert len(same) == 1, (layer, same)
            kept += same
        ranked = sorted(range(len(t)), key=lambda j: -scores[str(layer)][j])
        assert sorted(kept) == sorted(ranked[:KEEP[family]]), (layer, kept, scores[str(layer)])


def test_hidden_pruning_carries_the_shared_expert_gate_with_its_channels(runs, tmp_path):
    """Qwen2-MoE: the kept hidden channels (read off the embedding's columns) index the shared
    expert's sigmoid gate too, in the same order (ModelOpt leaves that gate whole; ours slices
    it, recipes/lib/modelopt_local.py)."""
    run, hf = runs["qwen2_moe"]
    out = tmp_path / "prune"
    assert prune.main(common(run, hf, "prune.num_attention_heads=null",
                             f"prune.output={out}")) == 0  # tiny.yaml's hidden 64 -> 48
    assert export.main(common(run, hf, f"export.input={out}",
                              f"export.output={tmp_path / 'hf'}")) == 0
    check_export(tmp_path / "hf")
    t, s = state(hf), state(tmp_path / "hf")
    emb_t, emb_s = t["model.embed_tokens.weight"], s["model.embed_tokens.weight"]
    kept = [next(j for j in range(emb_t.shape[1]) if torch.equal(emb_s[:, i], emb_t[:, j]))
            for i in range(emb_s.shape[1])]
    assert len(kept) == 48 and len(set(kept)) == 48
    for layer in range(4):
        gate = f"model.layers.{layer}.mlp.shared_expert_gate.weight"
        assert torch.equal(s[gate], t[gate][:, kept]), layer


@pytest.mark.parametrize("family", MOE_VARIANTS)
def test_prune_distill_export(runs, family):
    """Width, experts, expert FFN and depth pruned; distilled from the MoE teacher with the
    load-balancing loss; each stage's model loads in transformers with megatron's logits."""
    run, hf = runs[family]
    a = common(run, hf, f"prune.num_moe_experts={KEEP[family]}", *FULL)
    assert prune.main(a) == 0
    pm = manifest(run / "prune")["arch"]
    assert (pm["hidden_size"], pm["num_attention_heads"], pm["num_moe_experts"],
            pm["moe_ffn_hidden_size"], pm["num_layers"]) == (48, 2, KEEP[family], 32, 3)
    assert export.main([*a, f"export.input={run / 'prune'}",
                        f"export.output={run / 'export_pruned'}"]) == 0
    cfg = check_export(run / "export_pruned")["arch"]
    assert cfg == pm
    assert distill.main([*a, "distill.train_iters=4", "distill.eval_interval=4"]) == 0
    rows = [json.loads(x) for x in (run / "distill" / "logs" / "metrics.jsonl").read_text()
            .splitlines()]
    assert rows[-1]["valid_kd_loss"] < rows[0]["valid_kd_loss"]  # it learns
    balance = [r["load_balancing_loss"] for r in rows if "kd_loss" in r]
    assert len(balance) == 4 and all(0 < x < 10 for x in balance)
    assert export.main([*a, f"export.input={run / 'distill'}"]) == 0
    m = check_export(run / "export")
    assert m["num_params"] == manifest(run / "prune")["num_params"]
    assert evaluate.main(a) == 0 and report.main(a) == 0  # the report names the MoE axes
    text = (run / "report" / "report.md").read_text()
    teacher = manifest(run / "convert")["arch"]["num_moe_experts"]
    assert f"| num_moe_experts | {teacher} | {KEEP[family]} |" in text
    assert "| moe_ffn_hidden_size |" in text and "| active parameters |" in text


def test_load_balancing_weight_changes_the_router_only_when_set(runs, tmp_path):
    """The weight reaches megatron's router: 0 logs no load-balancing loss and trains other
    router weights than 0.5; the expert-free rest of the model is not what differs first."""
    run, hf = runs["qwen3_moe"]
    a = common(run, hf, "distill.train_iters=2", "distill.eval_interval=2",
               f"distill.input={run / 'convert'}")
    routers = {}
    for w in (0.0, 0.5):
        out = tmp_path / f"d{w}"
        assert distill.main([*a, f"distill.moe_aux_loss_coeff={w}",
                             f"distill.output={out}"]) == 0
        rows = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        assert any("load_balancing_loss" in r for r in rows) == (w > 0)
        assert export.main([*a, f"export.input={out}", f"export.output={tmp_path / f'h{w}'}"]) == 0
        routers[w] = state(tmp_path / f"h{w}")["model.layers.0.mlp.gate.weight"]
    assert not torch.allclose(routers[0.0], routers[0.5])


def test_a_moe_student_learns_from_a_dense_teacher(runs, tmp_path):
    """The pruned Qwen3-MoE student distilled from a dense Qwen3 of the same tokenizer (the
    data speak it): the KD loss falls, the router's load-balancing loss is the student's."""
    run, hf = runs["qwen3_moe"]
    dense = write_tiny_llama(tmp_path / "dense_hf", "qwen3")
    t = ["--config", TINY, f"run.dir={tmp_path}", f"convert.hf_path={dense}"]
    assert convert.main(t) == 0
    a = common(run, hf, f"prune.num_moe_experts={KEEP['qwen3_moe']}", *FULL)
    assert prune.main(a) == 0  # test_prune_distill_export's prune, or the same again
    out = tmp_path / "d"
    assert distill.main([*a, f"distill.teacher={tmp_path / 'convert'}", f"distill.output={out}",
                         "distill.train_iters=4", "distill.eval_interval=4"]) == 0
    rows = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["valid_kd_loss"] < rows[0]["valid_kd_loss"]
    assert all("load_balancing_loss" in r for r in rows[1:])
    m = manifest(out)
    assert m["arch"]["num_moe_experts"] == KEEP["qwen3_moe"]
    assert m["input"]["teacher"] == str((tmp_path / "convert").resolve())


def test_teacher_correction_of_a_moe_teacher(runs, tmp_path):
    """The teacher's own LM training on the data, its routers balanced and logged; the result
    exports."""
    run, hf = runs["mixtral"]
    out = tmp_path / "tc"
    a = common(run, hf, "teacher_correction.train_iters=2", f"teacher_correction.output={out}")
    assert teacher_correction.main(a) == 0
    rows = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["load_balancing_loss"] > 0 for r in rows if "lm_loss" in r)
    assert manifest(out)["arch"]["num_moe_experts"] == 3
    assert export.main([*a, f"export.input={out}", f"export.output={tmp_path / 'hf'}"]) == 0
    check_export(tmp_path / "hf")


def losses(out, key="kd_loss"):
    return {r["step"]: r[key] for r in (json.loads(x) for x in (out / "logs" / "metrics.jsonl")
                                        .read_text().splitlines()) if key in r}


@pytest.mark.slow
def test_ep2_trains_the_ep1_run_and_resumes_exactly(runs, tmp_path):
    """The pruned Qwen3-MoE student's 4 experts over two expert-parallel ranks: the losses,
    load-balancing losses and gradient norms of the one-process run; stopped by a signal after
    step 2 and rerun, the same history."""
    run, hf = runs["qwen3_moe"]
    a = common(run, hf, f"prune.num_moe_experts={KEEP['qwen3_moe']}", *FULL,
               "distill.train_iters=4", "distill.eval_interval=4", "distill.save_interval=100")
    assert prune.main(a) == 0  # test_prune_distill_export's prune, or the same again
    assert distill.main([*a, f"distill.output={tmp_path / 'ep1'}"]) == 0
    ep2 = [*a, "parallel.ep=2", f"distill.output={tmp_path / 'ep2'}"]
    p = torchrun("recipes.distill", *ep2, ok=False, env={FAULT_ENV: "signal_after:2"})
    assert p.returncode != 0 and "saved step 2 of 4" in p.stderr
    p = torchrun("recipes.distill", *ep2)
    assert "iter_0000002 (step 2)" in p.stderr
    for key in ("kd_loss", "lm_loss", "load_balancing_loss", "grad_norm"):
        one, two = losses(tmp_path / "ep1", key), losses(tmp_path / "ep2", key)
        assert one.keys() == two.keys() == {1, 2, 3, 4}, key
        for s in one:
            assert two[s] == pytest.approx(one[s], rel=1e-5, abs=1e-6), (key, s)
    assert manifest(tmp_path / "ep2")["parallel"]["ep"] == 2
    assert export.main([*a, f"export.input={tmp_path / 'ep2'}",
                        f"export.output={tmp_path / 'hf'}"]) == 0  # EP=2 -> one process
    check_export(tmp_path / "hf")


def test_active_parameter_target_through_the_search_and_tournament(runs, tmp_path):
    """prune.target_active_params: ModelOpt's search over hidden, heads, experts, expert FFN and
    layers; every candidate's active count (ModelOpt's and ours) is within the target while
    its total may be anything; the tournament distils each briefly and the winner exports."""
    run, hf = runs["qwen3_moe"]
    out = tmp_path / "prune"
    grid = ("{top_k: 2, hidden_size_divisor: 16, ffn_hidden_size_divisor: 8, "
            "num_moe_experts_divisor: 1, num_layers_divisor: 1, max_depth_pruning: 0.5, "
            "tournament_steps: 2}")
    a = common(run, hf, "prune.hidden_size=null", "prune.num_attention_heads=null",
               f"prune.output={out}")
    assert prune.main([*a, "prune.target_active_params=0.8", f"prune.search={grid}"]) == 0
    res = json.loads((out / "search.json").read_text())
    teacher = manifest(run / "convert")
    target = res["constraint"]["active_params"]
    assert target == pytest.approx(0.8 * res["teacher_active_params"])
    assert res["teacher_params"] == teacher["num_params"] > res["teacher_active_params"]
    assert res["decided_by"] == "tournament" and len(res["candidates"]) == 2
    for cand in res["candidates"]:
        assert cand["active_params"] <= cand["modelopt_active_params"] <= target
        assert cand["params"] > cand["active_params"]
        assert set(cand["arch"]) == {"hidden_size", "num_attention_heads", "num_moe_experts",
                                     "moe_ffn_hidden_size", "num_layers"}
        assert "tournament_kd_loss" in cand
    table = "\n".join(report.search_lines(res))
    assert "| candidate | hidden | heads | experts | expert FFN | layers | parameters | active |" \
        in table
    m = manifest(out)
    winner = next(c for c in res["candidates"] if c["winner"])
    assert {k: m["arch"][k] for k in winner["arch"]} == winner["arch"]
    assert export.main(common(run, hf, f"export.input={out}",
                              f"export.output={tmp_path / 'hf'}")) == 0
    check_export(tmp_path / "hf")


def test_moe_targets_are_checked_before_work(runs, tmp_path):
    run, hf = runs["qwen3_moe"]
    for extra, msg in (
            (["prune.ffn_hidden_size=32"], "is a mixture of experts: unset it and use "
                                           "prune.moe_ffn_hidden_size"),
            (["prune.num_moe_experts=1"], "fewer than the 2 experts each token is routed to"),
            (["prune.num_moe_experts=7"], "between 1 and the teacher's 6"),
            (["prune.hidden_size=null", "prune.num_attention_heads=null",
              "prune.target_active_params=0.8", "prune.target_params=0.8"], "not several"),
            (["prune.hidden_size=null", "prune.num_attention_heads=null",
              "prune.target_active_params=0.8", "prune.search={hparams: [ffn_hidden_size]}"],
             "names \\['ffn_hidden_size'\\], which the teacher \\(a mixture of experts\\)"),
            (["parallel.ep=2"], "prune with parallel.ep=1")):
        with pytest.raises(Exception, match=msg):
            prune.main(common(run, hf, f"prune.output={tmp_path / 'p'}", *extra))
    assert not (tmp_path / "p").exists()
    dense = Arch.from_hf_dir(write_tiny_llama(tmp_path / "dense", "gqa"))
    sizes = dict.fromkeys(("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers",
                           "drop_layers", "moe_ffn_hidden_size"))
    with pytest.raises(Refusal, match="num_moe_experts=2, but the teacher has no experts"):
        pruned_arch(dense, types.SimpleNamespace(**sizes, num_moe_experts=2,
                                                 depth_method="contiguous"))
