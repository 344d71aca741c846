"""`plan` on the paper's two recipes, without weights; impossible targets fail."""
import json
import re
from pathlib import Path

import pytest

from recipes import plan
from recipes.lib import layout

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("recipe, student", [("llama31_8b_to_4b_width", "4.51B"),
                                             ("llama31_8b_to_4b_depth", "4.54B")])
def test_paper_recipes(recipe, student, capsys):
    assert plan.main(["--config", str(CONF / f"{recipe}.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"| parameters | 8.03B | {student} " in out
    assert "94.0B tokens = 9,960 steps of 1152 x 8192" in out  # the paper's budget, distill's keys


def test_depth_recipe_drops_the_papers_block(capsys):
    plan.main(["--config", str(CONF / "llama31_8b_to_4b_depth.yaml")])
    assert "dropped layers (1-indexed): [16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, " \
           "29, 30, 31]" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["prune.hidden_size=5000"], "prune.hidden_size=5000 must be between 1 and the teacher's"),
    (["prune.num_attention_heads=20"], "multiple of the 8 KV groups"),
    (["prune.num_layers=40"], "prune.num_layers=40 must be between 1"),
    (["parallel.tp=3"], "parallel.tp=3 does not divide num_attention_heads=32"),
])
def test_impossible_targets(extra, message):
    with pytest.raises(ValueError, match=message):
        plan.main(["--config", str(CONF / "llama31_8b_to_4b_width.yaml"), *extra])


def test_depth_plan_refuses_dropping_too_many():
    with pytest.raises(ValueError, match="drops every layer"):
        plan.main(["--config", str(CONF / "llama31_8b_to_4b_depth.yaml"),
                   f"prune.drop_layers=[{','.join(str(i) for i in range(1, 33))}]"])


@pytest.mark.parametrize("recipe, teacher, student", [
    ("mistral_nemo_12b_to_8b_width", "12.25B", "8.41B"),  # Mistral-NeMo-Minitron-8B
    ("qwen3_8b_to_6b_depth", "8.19B", "5.88B"),           # NVIDIA's Qwen3-8B tutorial, 24 layers
])
def test_published_family_recipes(recipe, teacher, student, capsys):
    assert plan.main(["--config", str(CONF / f"{recipe}.yaml")]) == 0
    assert f"| parameters | {teacher} | {student} " in capsys.readouterr().out


def test_expected_speedup_follows_bytes_and_flops(capsys):
    """Width keeps every KV head: decode gains less than the parameter ratio, and less at a
    large batch (the KV cache is not smaller); depth halves the KV cache too, so it gains more
    at a large batch."""
    from recipes.lib import config

    def est(recipe):
        return plan.estimate(config.load(str(CONF / f"{recipe}.yaml"), [], "plan", ("prune",)))

    w, d = est("llama31_8b_to_4b_width"), est("llama31_8b_to_4b_depth")
    ratio = w["teacher"]["params"] / w["student"]["params"]
    sw, sd = w["inference_speedup"], d["inference_speedup"]
    assert 1 < sw["decode_batch_32"] < sw["decode_batch_1"] < ratio
    assert sd["decode_batch_32"] > sd["decode_batch_1"] > 1
    assert sw["prefill"] > 1 and sd["prefill"] > 1
    plan.main(["--config", str(CONF / "llama31_8b_to_4b_width.yaml")])
    assert f"decode {sw['decode_batch_1']:.2f}x at batch 1" in capsys.readouterr().out


SEARCH_8B = ["prune.hidden_size=null", "prune.ffn_hidden_size=null", "prune.num_layers=null",
             "prune.num_attention_heads=null", "prune.target_params=4.5e9"]


@pytest.mark.parametrize("budget_gb, encoding", [(4, "online"), (2000, "top-k"),
                                                 (1e6, "full")])
def test_search_preview_prices_the_tournament_and_its_teacher_cache(budget_gb, encoding, capsys):
    """The search's shapes fit the target by our count; a budget in tokens becomes whole steps
    of distill's global batch; the teacher cache is what the budget allows."""
    from recipes.lib import logit_cache
    from recipes.lib.train_config import TrainConfig

    argv = ["--config", str(CONF / "llama31_8b_to_4b_width.yaml"), *SEARCH_8B,
            f"prune.search={{tournament_tokens: 5e7, teacher_cache_max_gb: {budget_gb}}}"]
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    gbs, seq = 1152, 8192  # the recipe's (test_paper_recipes)
    steps = -(-50_000_000 // (gbs * seq))
    tokens = steps * gbs * seq
    assert f"4 candidates x {steps} steps ({tokens:,} tokens each)" in out
    sizes = [int(x.split("'params': ")[1].rstrip("}")) for x in out.splitlines()
             if x.startswith("  {'hidden_size'")]
    assert len(sizes) == 4 and max(sizes) <= 4.5e9 and sizes == sorted(sizes, reverse=True)
    sequences = (steps + TrainConfig.eval_iters) * gbs
    want = logit_cache.choose(sequences * seq, sequences, 128256, 128256, "bf16", None,
                              budget_gb)
    assert want["encoding"] == encoding
    line = next(x for x in out.splitlines() if x.startswith("  teacher:"))
    assert {"online": "online for each candidate (even the top 16",
            "top-k": f"top {want['top_k']}; the full vocabulary would take",
            "full": "(full vocabulary)"}[encoding] in line


@pytest.mark.parametrize("seq, precision, teacher, peak_gib", [
    (4096, "bf16", "bf16", 108.0), (4096, "fp8", "bf16", 113.1), (4096, "fp8", "fp8", 119.6),
    (8192, "bf16", "bf16", 123.2), (8192, "fp8", "bf16", 126.4), (8192, "fp8", "fp8", 132.9)])
def test_distill_memory_estimate_meets_the_h200s_peaks(seq, precision, teacher, peak_gib):
    """The peaks one H200 measured (docs/gpu.md, 2026-12-04: bench/gpu_distill.py, Llama-3.1-8B
    teacher and its 4.5B student, TE 2.20.2, distributed optimizer at DP=1; seq 8192 measured
    after the estimate was written): the estimate within 2% of each. Without TE's fp8 weight
    copies it was 5% and 10% under."""
    from recipes.lib.arch import Arch, training_memory

    t = Arch.from_hf_config(json.loads((CONF / "arch" / "llama-3.1-8b.json").read_text()))
    s = Arch(**{**t.to_dict(), "hidden_size": 3072, "ffn_hidden_size": 9216})
    est = training_memory(t, s, seq, 1, 1, 1, precision=precision,
                          teacher_precision=teacher) / 2**30
    assert est == pytest.approx(peak_gib, rel=0.02)


def test_plan_counts_fp8_and_recompute(capsys):
    """fp8 costs memory (cached fp8 weights; with TE's fp8 inputs saved instead of bf16), the
    teacher's fp8 more, and layers kept in bf16 at the edges give some of it back; recomputed
    layers keep their input alone."""
    from recipes.lib import config

    def distill_gb(*extra):
        e = plan.estimate(config.load(str(CONF / "llama31_8b_to_4b_width.yaml"), [
            *extra, "cluster.layout.distill.tp=1"], "plan", ("prune", "cluster")))
        return e["layouts"]["distill"].gb

    # at one layout for all (plan would choose another for some)
    bf16, fp8 = distill_gb(), distill_gb("distill.precision=fp8")
    both = distill_gb("distill.precision=fp8", "distill.teacher_precision=fp8")
    edges = distill_gb("distill.precision=fp8", "distill.fp8_bf16_edge_layers=2")
    assert bf16 < edges < fp8 < both
    assert distill_gb("distill.precision=bf16", "distill.fp8_bf16_edge_layers=2") == bf16
    plan.main(["--config", str(CONF / "llama31_8b_to_4b_width.yaml"), "distill.precision=fp8",
               "distill.recompute_layers=16"])
    assert ("(training counted with precision=fp8, teacher_precision=bf16, fp8_bf16_edge_layers=0, "
            "recompute_layers=16, precision_aware_optimizer=false: the recipe's distill section)"
            ) in capsys.readouterr().out
    half = distill_gb("distill.recompute_layers=16")
    every = distill_gb("distill.recompute_layers=32")
    assert every < half < bf16  # 32 layers: their inputs alone, and one layer's while recomputed


def test_a_training_configs_memory_settings_are_what_plan_counts():
    """A typed distill config hands arch.training_memory the same settings plan reads from
    the raw section: the teacher's fp8 from a KD config, none without a teacher."""
    from recipes.lib import config
    from recipes.lib.arch import Arch, training_memory
    from recipes.lib.train_config import KDConfig, TrainConfig

    t = Arch.from_hf_config(json.loads((CONF / "arch" / "llama-3.1-8b.json").read_text()))
    s = Arch(**{**t.to_dict(), "hidden_size": 3072, "ffn_hidden_size": 9216})
    over = ["distill.precision=fp8", "distill.teacher_precision=fp8",
            "distill.recompute_layers=4", "distill.fp8_bf16_edge_layers=1"]
    raw = layout.memory_settings(config.load(str(CONF / "llama31_8b_to_4b_width.yaml"), over,
                                           "plan", ("prune",)))
    kd = KDConfig(input="-", data=["-"], train_iters=4, warmup_iters=1, spec="te",
                  precision="fp8", teacher_precision="fp8", recompute_layers=4,
                  fp8_bf16_edge_layers=1)
    assert kd.memory_settings() == raw
    assert training_memory(t, s, 4096, 1, 1, 1, **kd.memory_settings()) > training_memory(
        t, s, 4096, 1, 1, 1, **{**kd.memory_settings(), "teacher_precision": "bf16"})
    assert TrainConfig(input="-", data=["-"], train_iters=4, warmup_iters=1,
                       precision="bf16").memory_settings()["teacher_precision"] == "bf16"


def load(recipe, *extra):
    from recipes.lib import config
    return config.load(str(CONF / f"{recipe}.yaml"), list(extra), "plan", ("prune", "cluster"))


def test_the_budget_is_distills_and_the_gpus_the_clusters():
    """One source of truth: distill.train_iters x global_batch_size x seq_length are the tokens
    plan prices, cluster.nodes.distill x gpus_per_node the GPUs; plan has no keys of its own
    for them."""
    base = plan.estimate(load("llama31_8b_to_4b_width"))["distill"]
    short = plan.estimate(load("llama31_8b_to_4b_width", "distill.train_iters=100"))["distill"]
    assert short["tokens"] == 100 * 1152 * 8192 and base["tokens"] == 9960 * 1152 * 8192
    assert short["gpu_hours"] == pytest.approx(base["gpu_hours"] * 100 / 9960)
    big = plan.estimate(load("llama31_8b_to_4b_width", "cluster.nodes.distill=32"))
    assert big["gpus"] == 256 and big["distill"]["wall_hours"] < base["wall_hours"] / 30
    from recipes.lib.config import ConfigError
    with pytest.raises(ConfigError, match="distill_tokens"):
        load("llama31_8b_to_4b_width", "plan.distill_tokens=1e9")


@pytest.mark.parametrize("memory, want", [(80, (1, 2, 0)), (141, (1, 1, 0)), (40, (1, 4, 0))])
def test_the_fastest_layout_that_fits_is_chosen(memory, want):
    """8 GPUs, Llama-3.1-8B -> 4.5B at seq 8192: TP=1 PP=1 does not fit an 80 GB GPU (the
    teacher, the student's state and fp32 logits of 128k columns), PP=2 does and its bubble
    over 288 micro-batches costs less than TP=2's all-reduces; a 141 GB GPU holds TP=1 PP=1 (as
    the H200 measured, 123 GiB at DP=1); every choice fits and is the fastest that does."""

    e = plan.estimate(load("llama31_8b_to_4b_width", f"plan.gpu_memory_gb={memory}"))
    got = e["layouts"]["distill"]
    assert (got.tp, got.pp, got.recompute_layers) == want
    assert layout.fits(got.gb, memory) and got.tp * got.pp * got.dp == 8
    t, s, _ = layout.models(load("llama31_8b_to_4b_width"))
    options = layout.candidates(t, s, gpus=8, seq=8192, global_batch=1152, micro_batch=1,
                                settings=layout.memory_settings(load("llama31_8b_to_4b_width")))
    faster = [x for x in options if x.slowdown < got.slowdown]
    assert not any(layout.fits(x.gb, memory) for x in faster)
    assert len(faster) == {80: 1, 141: 0, 40: 2}[memory]


def test_an_impossible_layout_is_refused_with_the_fix():

    with pytest.raises(ValueError, match=r"cluster.layout.distill=\{'tp': 3, 'pp': 1\} does not "
                       "divide the models, the 8 GPUs and the global batch: remove it"):
        layout.stage_layout(load("llama31_8b_to_4b_width", "cluster.layout.distill.tp=3"),
                            "distill")
    e = plan.estimate(load("llama31_8b_to_4b_width", "plan.gpu_memory_gb=8"))
    assert "distill" not in e["layouts"]
    assert "distill on 8 GPUs: no layout fits 90% of 8 GB per GPU" in e["layout_problems"][-1]


def test_teacher_correction_is_laid_out_at_its_own_settings():
    """Teacher correction trains the 8B teacher at its own sequence length and batch, not
    distill's: at 8192 it needs PP=2 on 80 GB GPUs, at 2048 TP=1 PP=1 fits."""
    short = load("llama31_8b_to_4b_width", "teacher_correction.seq_length=2048")
    own = layout.stage_layout(short, "teacher_correction")
    paper = layout.stage_layout(load("llama31_8b_to_4b_width"), "teacher_correction")
    assert (own.tp, own.pp) == (1, 1) and (paper.tp, paper.pp) == (1, 2)
    assert layout.fits(own.gb, 80) and not layout.fits(
        layout.candidates(None, *layout.models(short)[:1], gpus=8, seq=8192, global_batch=1152,
                          micro_batch=1, settings=layout.memory_settings(short))[0].gb, 80)
    distill = layout.stage_layout(short, "distill")
    assert (distill.tp, distill.pp) == (1, 2)  # distill keeps its own 8192


def test_moe_recipe_plans_total_and_active_parameters_and_expert_parallelism(capsys):
    """Qwen3-30B-A3B: the published 30.5B / 3.3B, the search's largest candidate at 70% of the
    active parameters, and a distillation layout that shares the experts out (EP)."""
    assert plan.main(["--config", str(CONF / "qwen3_30b_a3b_to_a2b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "| parameters | 30.53B | 21.03B " in out
    assert "| active parameters (per token) | 3.35B | 2.34B " in out
    assert re.search(r"distill \(per GPU, TP=\d PP=\d DP=\d EP=[248]\)\s+[\d.]+ GB  fits", out)


def test_expert_parallelism_shares_out_the_expert_weights_only():
    from recipes.lib import search
    from recipes.lib.arch import Arch, training_memory

    t = Arch.from_hf_config(json.loads((CONF / "arch" / "qwen3-30b-a3b.json").read_text()))
    assert (t.num_params(), t.num_active_params()) == (30_532_122_624, 3_353_032_704)
    # ModelOpt's counter (what the search's active_params constraint reads) agrees with ours
    # but for the padded vocabulary of the untied embedding and output layer
    pad = (t.padded_vocab_size - t.vocab_size) * t.hidden_size * 2
    assert search.measure(t, {"active_params": 1}, {}) == t.num_active_params() + pad
    assert search.measure(t, {"params": 1}, {}) == t.num_params() + pad
    one, four = (training_memory(t, t, 4096, 1, 2, 8, ep=ep) for ep in (1, 4))
    experts = t.expert_params()
    assert one - four == pytest.approx((2 + 6) * experts / 2 * (1 - 1 / 4))
