"""Mixtures of experts (Qwen3-MoE, Mixtral) through convert and export, on tiny random models
the tests write: every weight back exactly, logits equal to the family's own transformers class,
at TP, PP and expert-parallel layouts with resharding between them; held-out shapes (experts not
a power of two, top-1 and top-2, renormalised top-k weights or not); the parameter counts, total
and active."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import convert, export
from recipes.lib.arch import FAMILIES, Arch
from recipes.lib.layout import validate_layout
from recipes.lib.errors import Refusal
from tests.conftest import TINY, torchrun
from tests.tiny_models import MOE_VARIANTS, state, write_tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe")
    out = {v: write_tiny_llama(base / v, v) for v in MOE_VARIANTS}
    # held out: Qwen3-MoE at top-1 without renormalisation (the softmax over all experts)
    out["qwen3_moe_top1"] = write_tiny_llama(base / "top1", "qwen3_moe", num_experts_per_tok=1,
                                             norm_topk_prob=False)
    return out


def hf(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def check_round_trip(src, run, family):
    """The export holds every source weight exactly, loads as the family's own class with the
    source model's logits, and its manifest's parity and parameter count hold."""
    out = run / "export"
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"]["parity_max_abs_diff"] < 1e-4  # megatron vs the exported HF
    a, b = state(src), state(out)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    model, ref = hf(out), hf(src)
    assert type(model).__name__ == FAMILIES[family]["architectures"]
    assert sum(p.numel() for p in model.parameters()) == m["num_params"]
    tokens = torch.randint(0, 90, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(tokens).logits - ref(tokens).logits).abs().max().item() < 1e-5
    for k in ("num_experts_per_tok", "norm_topk_prob", "num_local_experts",
              "moe_intermediate_size", "intermediate_size", "shared_expert_intermediate_size"):
        assert getattr(model.config, k, None) == getattr(ref.config, k, None), k


@pytest.mark.parametrize("variant", ["qwen3_moe", "mixtral", "qwen2_moe", "qwen3_moe_top1"])
def test_round_trip_single_process(models, tmp_path, variant):
    src = models[variant]
    args = ["--config", TINY, f"run.dir={tmp_path}"]
    assert convert.main(args + [f"convert.hf_path={src}"]) == 0
    arch = json.loads((tmp_path / "convert" / "manifest.json").read_text())["arch"]
    assert arch["num_moe_experts"] == {"mixtral": 3, "qwen2_moe": 5}.get(variant, 6)
    assert arch["moe_norm_topk_prob"] is (variant not in ("qwen3_moe_top1", "qwen2_moe"))
    assert arch["moe_shared_expert_intermediate_size"] == (56 if variant == "qwen2_moe" else None)
    assert export.main(args) == 0
    check_round_trip(src, tmp_path, variant.removesuffix("_top1"))


@pytest.mark.slow
@pytest.mark.parametrize("variant, written, read", [
    # experts shared out over two expert-parallel ranks, then resharded on load to TP=2 (each
    # expert's GLU split over expert TP), and the other way round
    ("qwen3_moe", "parallel.ep=2", "parallel.tp=2"),
    ("qwen3_moe", "parallel.tp=2", "parallel.ep=2"),
    ("mixtral", "parallel.pp=2", "parallel.pp=2"),  # the tied output layer on the last stage
    ("qwen2_moe", "parallel.tp=2", "parallel.pp=2"),  # the shared expert split like a dense MLP
])
def test_parallel_round_trips(models, tmp_path, variant, written, read):
    src = models[variant]
    args = ["--config", TINY, f"run.dir={tmp_path}"]
    torchrun("recipes.convert", *args, f"convert.hf_path={src}", written)
    torchrun("recipes.export", *args, read)
    check_round_trip(src, tmp_path, variant)


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_parameter_counts(models, variant):
    """Arch's closed-form total count is the HF model's; the active count is the dense part plus
    each layer's router and top-k experts."""
    src = models[variant]
    arch = Arch.from_hf_dir(src)
    model = hf(src)
    assert arch.num_params() == sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if "experts" in n)
    per_expert = expert // (arch.num_layers * arch.num_moe_experts)
    assert arch.num_active_params() == (arch.num_params() - expert
                                        + arch.num_layers * arch.moe_router_topk * per_expert)


def test_refusals(models, tmp_path):
    cfg = json.loads((models["qwen3_moe"] / "config.json").read_text())
    for change, words in (({"mlp_only_layers": [1]}, "mlp_only_layers=[1]"),
                          ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
                          ({"shared_expert_intermediate_size": 8},
                           "a qwen3_moe has no shared expert"),
                          ({"num_experts_per_tok": 7}, "moe_router_topk=7"),
                          ({"num_experts_per_tok": None}, "lacks ['num_experts_per_tok']")):
        with pytest.raises(Refusal, match=words.replace("[", r"\[").replace("]", r"\]")):
            Arch.from_hf_config({**cfg, **change})
    # EP must divide the 6 experts: refused before any process group or folder
    with pytest.raises(Refusal, match="parallel.ep=4 does not divide num_moe_experts=6"):
        convert.main(["--config", TINY, f"run.dir={tmp_path}", "parallel.ep=4",
                      f"convert.hf_path={models['qwen3_moe']}"])
    assert not (tmp_path / "convert").exists()
    with pytest.raises(Refusal, match="parallel.ep=4 does not divide num_moe_experts=6"):
        validate_layout(Arch.from_hf_dir(models["qwen3_moe"]), 1, 1, 4)
    with pytest.raises(Refusal, match="parallel.ep=2: the model has no experts"):
        validate_layout(Arch.from_hf_config({**cfg, "model_type": "qwen3"}), 1, 1, 2)
