"""The oneDNN fp32 linear fast path (recipes/lib/cpu_linear.py, compat FAST_PATHS
"onednn_linear") against the GEMMs it replaces: torch's F.linear, megatron's linear functions
and a transformers model's nn.Linear layers. Equal outputs and gradients up to fp32 summation
order, taken only where it applies."""
from __future__ import annotations

import pytest
import torch

from recipes.lib import compat, cpu_linear


@pytest.fixture
def forced(monkeypatch):
    """oneDNN forced on for every size, with a count of the calls that took it."""
    calls = []
    real = cpu_linear.linear
    monkeypatch.setattr(cpu_linear, "FORCE", True)
    monkeypatch.setattr(cpu_linear, "MIN_MACS", 0)
    monkeypatch.setattr(cpu_linear, "linear", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    err = ((a - b).abs().max() / b.abs().max()).item()
    print(f"max error / max entry = {err:.1e}")
    return a.shape == b.shape and err < 1e-5


def inputs(trained: bool, bias: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    w = torch.randn(96, 64, generator=g, requires_grad=trained)
    b = torch.randn(96, generator=g, requires_grad=trained) if bias else None
    return x, w, b


@pytest.mark.parametrize("trained", [True, False], ids=["trained", "frozen"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_and_gradients_equal_torch(trained, bias):
    x, w, b = inputs(trained, bias)
    y = cpu_linear.linear(x, w, b)
    grads = torch.autograd.grad((y * y.detach().sin()).sum(), [t for t in (x, w, b)
                                                              if t is not None and t.requires_grad])
    x2, w2, b2 = inputs(trained, bias)
    y2 = torch.nn.functional.linear(x2, w2, b2)
    grads2 = torch.autograd.grad((y2 * y2.detach().sin()).sum(), [t for t in (x2, w2, b2)
                                                                  if t is not None and t.requires_grad])
    assert close(y, y2)
    assert len(grads) == len(grads2) == (3 if trained and bias else 2 if trained else 1)
    for g, g2 in zip(grads, grads2):
        assert close(g, g2)


def test_taken_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(cpu_linear, "FORCE", True)
    big = torch.zeros(2048, 576), torch.zeros(1536, 576)
    assert cpu_linear.usable(*big)
    assert not cpu_linear.usable(big[0].bfloat16(), big[1].bfloat16())  # bf16: torch's oneDNN
    assert not cpu_linear.usable(torch.zeros(4, 64), torch.zeros(64, 64))  # overhead > gain
    monkeypatch.setattr(cpu_linear, "FORCE", None)
    monkeypatch.setattr(cpu_linear, "probe", lambda: (False, "MKL faster here"))
    assert not cpu_linear.usable(*big)


def test_probe_decides_by_measured_speed():
    use, why = cpu_linear.probe()
    assert isinstance(use, bool) and "oneDNN" in why
    assert cpu_linear.probe() == (use, why)  # measured once per process


def test_megatron_linear_layers_take_it(forced):
    compat.apply()
    from megatron.core.tensor_parallel import layers

    x, w, b = inputs(True, True)
    kw = dict(gradient_accumulation_fusion=False, allreduce_dgrad=False, sequence_parallel=False,
              grad_output_buffer=None, gtp_remat_size=1)
    y = layers.linear_with_grad_accumulation_and_async_allreduce(x, w, b, **kw)
    assert forced == [x.shape]
    y.sum().backward()
    x2, w2, b2 = inputs(True, True)
    y2 = layers.linear_with_grad_accumulation_and_async_allreduce.__wrapped__(x2, w2, b2, **kw)
    y2.sum().backward()
    assert close(y, y2) and close(x.grad, x2.grad) and close(w.grad, w2.grad)
    x, w, _ = inputs(False, False)
    layers.linear_with_frozen_weight(x, w, None, tp_group=None, **kw)
    assert len(forced) == 2
    # what it does not cover (TP > 1 all-reduce, sequence parallel, fusions) keeps megatron's
    for other in ({"allreduce_dgrad": True}, {"sequence_parallel": True},
                  {"gradient_accumulation_fusion": True}):
        try:  # megatron's own path: it may need what this process has not set up
            layers.linear_with_frozen_weight(x, w, None, tp_group=None, **{**kw, **other})
        except Exception:  # noqa: BLE001
            pass
    assert len(forced) == 2


def test_transformers_linear_layers_take_it(forced):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        fast = compat.hf_linears(model)(ids).logits
    assert len(forced) == 2 * 7 + 1  # q k v o gate up down per layer, and the output layer
    assert close(fast, ref)
