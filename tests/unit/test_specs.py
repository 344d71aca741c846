"""One function chooses the layer spec for every stage; fp8 and spec combinations are refused
before any work; checkpoints load across specs with exactly TE's `_extra_state` allowed."""
import importlib.util

import pytest
import torch

from recipes.lib import checkpoint, runtime, train, train_config
from tests.unit.test_mapping_8b import LLAMA31_8B

NO_TE = importlib.util.find_spec("transformer_engine") is None or not torch.cuda.is_available()


@pytest.mark.skipif(not NO_TE, reason="a machine with TE picks te")
def test_auto_is_local_without_te_and_te_is_refused():
    assert runtime.resolve_spec("auto") == "local"
    assert runtime.resolve_spec("local") == "local"
    with pytest.raises(ValueError, match="spec=te needs Transformer Engine"):
        runtime.resolve_spec("te")
    with pytest.raises(ValueError, match="spec='fast'; use one of"):
        runtime.resolve_spec("fast")


def tc(**kw):
    return train_config.TrainConfig(input="-", data=["-"], train_iters=4, warmup_iters=1, **kw)


def test_fp8_with_the_local_spec_is_refused_at_config_time():
    with pytest.raises(ValueError, match="precision=fp8 runs its matmuls in Transformer Engine"):
        tc(precision="fp8", spec="local")
    with pytest.raises(ValueError, match="fp8_recipe='fancy'"):
        tc(precision="fp8", fp8_recipe="fancy")
    with pytest.raises(ValueError, match="MINITRON_FAULT='kill:3'"):
        with pytest.MonkeyPatch.context() as m:
            m.setenv("MINITRON_FAULT", "kill:3")  # the tests' channel, not a recipe key
            tc()
    with pytest.raises(ValueError, match="unknown key"):
        from recipes.lib import config
        config.load("conf/tiny.yaml", ["run.dir=x", "distill.fault=kill_after:3"], "distill")


@pytest.mark.skipif(not NO_TE, reason="with TE fp8 is allowed")
def test_fp8_without_te_is_refused_before_loading():
    from recipes.lib import train_stage

    with pytest.raises(ValueError, match="precision=fp8 needs Transformer Engine"):
        train_stage.check_precision(tc(precision="fp8"))


def test_fp8_edge_layers_and_the_optimizer_kind_are_checked_before_work():
    from recipes.distill import DistillConfig
    from recipes.lib import model as M
    from recipes.lib import train_stage
    from recipes.lib.arch import Arch

    kw = train_stage.fp8_recipe_kwargs(tc(precision="fp8", fp8_bf16_edge_layers=2))
    assert kw["first_last_layers_bf16"] is True
    assert kw["num_layers_at_start_in_bf16"] == kw["num_layers_at_end_in_bf16"] == 2
    assert "first_last_layers_bf16" not in train_stage.fp8_recipe_kwargs(tc(precision="fp8"))
    a = Arch.from_hf_config(LLAMA31_8B)
    a = Arch(**{**a.to_dict(), "num_layers": 6, "hidden_size": 64, "ffn_hidden_size": 128,
                "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 16})
    with runtime.distributed(1, 1):  # megatron knows every field the recipe sets
        cfg = M.transformer_config(a, "bf16", **{k: v for k, v in kw.items() if "fp8" != k})
    assert cfg.first_last_layers_bf16 and cfg.num_layers_at_end_in_bf16 == 2
    with pytest.raises(ValueError, match="fp8_bf16_edge_layers=-1 must be >= 0"):
        tc(fp8_bf16_edge_layers=-1)
    with pytest.raises(ValueError, match="precision_aware_optimizer stores bf16 weights"):
        tc(precision="fp32", precision_aware_optimizer=True)
    assert train.optimizer_kind(tc(precision="bf16")) == (
        "distributed" if torch.cuda.is_available() else "standard")
    assert train.optimizer_kind(tc(optimizer="distributed")) == "distributed"
    with pytest.raises(ValueError, match="precision_aware_optimizer runs in megatron's "
                                         "distributed optimizer: set optimizer=auto"):
        tc(precision="bf16", precision_aware_optimizer=True, optimizer="standard")
    with pytest.raises(ValueError, match="optimizer='zero'; use auto, standard or distributed"):
        tc(optimizer="zero")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="optimizer=distributed on a CPU runs at DP=1 only"):
            train.check_optimizer(tc(optimizer="distributed"), dp=2)
    if NO_TE:
        with pytest.raises(ValueError, match="precision_aware_optimizer needs Transformer "
                                             "Engine's FusedAdam on a CUDA GPU"):
            train.check_optimizer(tc(precision="bf16", precision_aware_optimizer=True), dp=1)
        with pytest.raises(ValueError, match="precision=fp8 needs Transformer Engine"):
            train_stage.check_precision(DistillConfig(  # an fp8 teacher alone, too
                input="-", teacher="-", data=["-"], train_iters=4, warmup_iters=1,
                precision="bf16", teacher_precision="fp8"))


def test_fp8_builds_the_student_in_fp8_and_the_teacher_in_bf16():
    from recipes.distill import DistillConfig
    from recipes.lib import train_stage

    c = DistillConfig(input="-", teacher="-", data=["-"], train_iters=4, warmup_iters=1,
                      precision="fp8", fp8_recipe="tensorwise")
    assert c.teacher_precision == "bf16"
    student = train_stage.build_kwargs(c)
    teacher = train_stage.build_kwargs(c, c.teacher_precision)
    assert student["fp8"] == "hybrid" and student["fp8_recipe"] == "tensorwise"
    assert student["dtype"] == teacher["dtype"] == "bf16" and "fp8" not in teacher
    both = DistillConfig(input="-", teacher="-", data=["-"], train_iters=4, warmup_iters=1,
                         precision="fp8", teacher_precision="fp8")
    assert train_stage.build_kwargs(both, both.teacher_precision)["fp8"] == "hybrid"
    fp32 = DistillConfig(input="-", teacher="-", data=["-"], train_iters=4, warmup_iters=1,
                         precision="fp32")
    assert fp32.teacher_precision == "fp32"  # exact CPU tests keep an fp32 teacher


def test_key_mismatch_allows_only_te_extra_state():
    extra = ["decoder.layers.0.self_attention.linear_qkv._extra_state",
             "decoder.layers.self_attention.core_attention._extra_state"]
    checkpoint.check_key_mismatch("ckpt", extra, extra[:1])  # TE <-> local: fine
    with pytest.raises(KeyError, match=r"model needs \['output_layer.weight'\]"):
        checkpoint.check_key_mismatch("ckpt", [*extra, "output_layer.weight"], [])
    with pytest.raises(KeyError, match=r"checkpoint holds \['decoder.layers.9.mlp"):
        checkpoint.check_key_mismatch("ckpt", [], ["decoder.layers.9.mlp.linear_fc1.weight"])


def test_peak_flops_table_never_borrows_another_chip():
    from recipes.lib.metrics import peak_tflops

    assert peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA GH200 480GB", "fp8") == 1979.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp8") is None  # no fp8 on Ampere
    assert peak_tflops("NVIDIA L40S", "bf16") is None  # unknown: MFU omitted


def test_a_steps_speed_counts_model_flops_per_rank_and_mfu_where_the_peak_is_known(monkeypatch):
    from recipes.lib import metrics

    assert metrics.speed(4096, 2.0, None) == {"tokens_per_s": 2048.0}  # no FLOP count: no more
    assert metrics.speed(4096, 2.0, 1e9) == {"tokens_per_s": 2048.0,  # a CPU: no MFU
                                              "model_tflops_per_rank": 2048e9 / 1e12}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 8)
    got = metrics.speed(8 * 11374, 1.0, 44e9)  # the H200's TE bf16 run, as if on 8 GPUs
    assert got["model_tflops_per_rank"] == pytest.approx(500.5, rel=1e-3)
    assert got["mfu"] == pytest.approx(500.5 / 989, rel=1e-3)
