"""bench/op_clock.py: where a step's time goes by kind of kernel, and the ceiling bench/distill.py
derives from it."""
import sys
import time
import types

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT))
from bench import distill, op_clock  # noqa: E402 (after the path)


@pytest.mark.parametrize("name,kind", [
    ("aten.mm.default", "gemm"), ("aten.addmm.default", "gemm"), ("aten.bmm.default", "gemm"),
    ("aten.baddbmm.default", "gemm"), ("mkldnn._linear_pointwise.default", "gemm"),
    ("aten._scaled_dot_product_flash_attention_for_cpu.default", "attention"),
    ("aten._scaled_dot_product_flash_attention_for_cpu_backward.default", "attention"),
    ("aten.mul.Tensor", "other"), ("aten.mm_like.default", "other"),
    ("aten._log_softmax.default", "other")])
def test_operators_are_sorted_by_kind(name, kind):
    assert op_clock.kind(name) == kind


def test_the_clock_puts_each_operator_s_time_in_its_kind():
    """A training step's worth of operators: a linear (forward and backward), causal attention
    and elementwise work; a 50 ms sleep outside any operator is in none of them."""
    x = torch.randn(256, 128, requires_grad=True)
    w = torch.randn(512, 128, requires_grad=True)
    q = torch.randn(2, 4, 64, 32, requires_grad=True)
    clock = op_clock.OpClock()
    t0 = time.perf_counter()
    with clock:
        y = torch.nn.functional.linear(x, w)
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        (y.square().sum() + a.exp().sum()).backward()
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    assert set(clock.seconds) == {"gemm", "attention", "other"}
    assert all(s > 0 for s in clock.seconds.values())
    assert sum(clock.seconds.values()) < wall - 0.05
    assert x.grad is not None and q.grad is not None  # the operators ran, under the clock


def test_a_step_splits_into_its_kernels_and_the_rest():
    assert op_clock.split(10.0, {"gemm": 7.0, "attention": 1.25, "other": 0.5}) == {
        "gemm_s": 7.0, "attention_s": 1.25, "rest_s": 1.75}
    assert op_clock.split(2.0, {"other": 0.5}) == {"gemm_s": 0.0, "attention_s": 0.0,
                                                   "rest_s": 2.0}


def test_the_ceiling_is_the_reference_step_over_our_shared_kernels():
    """Ours 10 s a step of which 8 s GEMMs + attention; the reference 11 s: 1.1x now, and at
    most 11 / 8 = 1.375x however cheap the rest of our step became. The first two steps of
    each side (warm-up) are not in the medians."""
    a = types.SimpleNamespace(seq=256, batch=8, steps=5, demo=True)
    ours = {"step_s": [30.0, 20.0, 10.0, 10.0, 9.0], "peak_rss_mb": 5000,
            "clock": {"gemm": 7.0, "attention": 1.0, "other": 1.5}}
    ref = {"step_s": [40.0, 20.0, 11.0, 12.0, 11.0], "peak_rss_mb": 6000,
           "clock": {"gemm": 7.1, "attention": 0.9, "other": 2.5}}
    r = distill.report(a, "fp32", ours, ref)
    assert r["ours"] == {"tokens_per_s": round(2048 / 10), "peak_rss_mb": 5000, "step_s": 10.0,
                         "gemm_s": 7.0, "attention_s": 1.0, "rest_s": 2.0}
    assert r["transformers_kd"]["step_s"] == 11.0 and r["transformers_kd"]["rest_s"] == 3.0
    assert r["ratio_tokens_per_s"] == 1.1 and r["ratio_peak_rss"] == 0.83
    assert r["ceiling_ratio_tokens_per_s"] == 1.38  # 11 / 8, rounded
