"""The CPU compatibility module: scoped, idempotent, and it does what each entry says."""
import importlib
import importlib.util

import pytest
import torch

from recipes.lib import compat, errors, upstream

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only patches")


def test_patches_are_scoped_to_the_listed_modules():
    compat.apply()
    compat.apply()  # idempotent
    for name in compat.CUDA_HARDCODED_MODULES:
        assert isinstance(importlib.import_module(name).torch, compat._CpuTorch), name
    import megatron.core.transformer.transformer_block as untouched

    assert untouched.torch is torch
    assert torch.cuda.current_device is not compat._CpuCuda.current_device


def test_proxy_maps_cuda_to_cpu():
    proxy = compat._CpuTorch()
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert proxy.tensor([1.0], device=torch.device("cuda")).device.type == "cpu"
    assert proxy.cuda.current_device() == "cpu"
    assert proxy.float32 is torch.float32  # everything else is the real torch


def test_tensor_cuda_identity_is_temporary():
    t = torch.ones(1)
    with compat.tensor_cuda_is_identity():
        assert t.cuda() is t
    with pytest.raises((AssertionError, RuntimeError)):
        t.cuda()


def test_triton_standin_raises_if_used():
    if importlib.util.find_spec("triton") is not None:
        pytest.skip("triton is installed: megatron's real paged_stash is used, no stand-in")
    compat.apply()
    from megatron.core.transformer.moe.ops import paged_stash

    with pytest.raises(RuntimeError, match="needs triton"):
        paged_stash.paged_stash_copy_kernel()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sdpa_attention_equals_megatron_attention(dtype, monkeypatch):
    """The CPU fast path `sdpa_attention` gives megatron's local attention's logits and
    gradients (GQA, head_dim != hidden/heads), and only replaces the cases it covers."""
    from recipes.lib import runtime
    from recipes.lib.arch import Arch

    arch = Arch(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6,
                num_query_groups=2, head_dim=16, vocab_size=256, tie_embeddings=False,
                rope_theta=10000.0, rope_scaling_factor=None, norm_eps=1e-5,
                max_position_embeddings=128)
    tokens = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40).unsqueeze(0)
    calls = []

    def run(fast):
        monkeypatch.setitem(compat.FAST_PATHS, "sdpa_attention", fast)
        torch.manual_seed(0)
        model = M.build(arch, dtype=dtype, spec="local", init=True)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda *a, **k: calls.append(fast) or sdpa(*a, **k))
        out = model(tokens, pos, attention_mask=None)
        out.float().square().mean().backward()
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        return out.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                      if p.grad is not None}

    with runtime.distributed(1, 1):
        from recipes.lib import model as M

        fast, fast_grads = run(True)
        slow, slow_grads = run(False)
    assert calls == [True, True]  # two layers, fast path only when switched on
    tol = 1e-5 if dtype == "fp32" else 2e-2
    assert (fast - slow).abs().max() <= tol * slow.abs().max()
    assert fast_grads.keys() == slow_grads.keys()
    for name, g in slow_grads.items():
        assert (fast_grads[name] - g).abs().max() <= tol * g.abs().max() + 1e-12, name


def small_arch():
    """A two-layer GQA Llama for the tests that build a megatron model here."""
    from recipes.lib.arch import Arch

    return Arch(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                num_query_groups=2, head_dim=8, vocab_size=100, tie_embeddings=False,
                rope_theta=1e4, rope_scaling_factor=None, norm_eps=1e-6,
                max_position_embeddings=64)


def test_training_logits_keep_the_output_layer_layout():
    """Within compat.logits_as_computed a GPTModel returns its output layer's [s, b, v] logits
    (no transposed copy): the same numbers as the [b, s, v] it returns otherwise, and on the
    output layer's own storage."""
    from recipes.lib import compat, runtime
    from recipes.lib import model as M

    arch = small_arch()
    with runtime.distributed(1, 1):
        m = M.build(arch, init=True).eval()
        seen = []
        m.output_layer.register_forward_hook(lambda mod, i, o: seen.append(o[0]))
        tokens = torch.randint(0, 100, (3, 16))
        pos = torch.arange(16).expand(3, 16)
        with torch.no_grad():
            usual = m(tokens, pos, attention_mask=None)
            with compat.logits_as_computed():
                kept = m(tokens, pos, attention_mask=None)
            after = m(tokens, pos, attention_mask=None)
    assert usual.shape == (3, 16, 128) and kept.shape == (16, 3, 128)
    assert torch.equal(kept.transpose(0, 1), usual) and torch.equal(after, usual)
    assert kept.data_ptr() == seen[1].data_ptr()  # the output layer's tensor, not a copy


def test_where_te_is_installed_without_cuda_the_local_model_and_optimizer_stay_local(
        monkeypatch):
    """The NVIDIA container on a CPU machine: TE imports, CUDA does not exist. megatron then
    takes TE's norm for the decoder's final norm around local layers, and TE's fused Adam and
    multi-tensor kernels for the optimizer; each allocates on CUDA. Here megatron's TE choices
    are stood in by classes that fail the same way: the local model must not use them
    (model.block_spec), nor the optimizer (compat's Mechanism 4, re-applied)."""
    import importlib

    from recipes.lib import compat, runtime, train, train_config
    from recipes.lib import model as M  # compat.apply(): megatron imports here

    class CudaOnly(torch.nn.Module):  # what TE's modules and FusedAdam do without a GPU
        def __init__(self, *a, **k):
            raise RuntimeError("Found no NVIDIA driver on your system")

    block = importlib.import_module("megatron.core.transformer.transformer_block")
    monkeypatch.setattr(block, "LayerNormImpl", CudaOnly)
    for mod_name, values in compat._no_fused_optimizer().items():  # TE's globals instead
        mod = importlib.import_module(mod_name)
        for name in values:
            monkeypatch.setattr(mod, name, CudaOnly if name in ("Adam", "SGD") else
                                False if name == "USING_PYTORCH_OPTIMIZER" else
                                True if name == "HAVE_APEX_OR_TE" else getattr(mod, name))
    compat.use_unfused_optimizer()  # what apply() does on a CPU (monkeypatch restores TE's)
    arch = small_arch()
    with runtime.distributed(1, 1):
        model = M.build(arch, dtype="fp32", spec="local", init=True)
        assert type(model.decoder.final_layernorm) is not CudaOnly
        assert type(model.decoder.final_layernorm) is type(model.decoder.layers[0].input_layernorm)
        cfg = train_config.TrainConfig(input="-", data=["-"], train_iters=2, warmup_iters=0)
        ddp, opt, _ = train.build_optimizer(model, cfg)
        assert type(opt.optimizer).__module__.startswith("torch.optim")


def test_activation_recompute_runs_on_a_cpu_with_the_same_gradients():
    """megatron's recompute (block method) saves and restores the CUDA generator around each
    recomputed layer; without CUDA it failed ("Torch not compiled with CUDA enabled"; compat's
    mechanism 5). Recomputing 1 or both layers gives the same loss and gradients, bit for bit,
    and keeps less for the backward; `plan`'s peak (arch.stored_activations) falls too."""
    from recipes.lib import runtime
    from recipes.lib import model as M
    from recipes.lib.arch import stored_activations

    arch, tokens = small_arch(), torch.randint(0, 100, (2, 32))
    runs = {}
    with runtime.distributed(1, 1):
        for layers in (0, 1, 2):
            torch.manual_seed(0)
            kw = {"recompute_granularity": "full", "recompute_method": "block",
                  "recompute_num_layers": layers} if layers else {}
            m = M.build(arch, dtype="fp32", init=True, **kw).train()
            kept = []
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t):
                loss = m(tokens, torch.arange(32).expand(2, 32), None, labels=tokens).mean()
            loss.backward()
            runs[layers] = loss.item(), [p.grad for p in m.parameters()], sum(kept)
    for layers in (1, 2):
        assert runs[layers][0] == runs[0][0]
        assert all(torch.equal(a, b) for a, b in zip(runs[layers][1], runs[0][1]))
    assert runs[0][2] > runs[1][2] > runs[2][2]
    plan = [stored_activations(arch, 32, 2, r) for r in (0, 1, 2)]  # peaks: the backward
    assert plan[0] > plan[2] > plan[1]  # recomputes a layer in full, after layer 2's are freed


def test_the_wrapped_upstream_signatures_are_what_the_wrappers_read():
    """Every positional wrapper's upstream callable, as installed, takes the parameters the
    wrapper reads (this fails the day a pinned release renames or reorders them)."""
    compat.apply()
    for path, expected in upstream.SIGNATURES.items():
        upstream.check_signature(path, expected)
    from recipes.lib import modelopt_local
    modelopt_local.enable()  # ModelOpt's two wrapped functions, checked as they are wrapped


def test_a_changed_upstream_signature_is_refused_naming_it():
    def linear(input, weight, bias, sequence_parallel, allreduce_dgrad, *a):  # reordered
        return input

    with pytest.raises(errors.BadState, match=r"m:linear now takes \('input', 'weight', 'bias', "
                       r"'sequence_parallel', 'allreduce_dgrad', .*where the patch that wraps it "
                       r"reads .*'gradient_accumulation_fusion'"):
        upstream.check_signature("m:linear", upstream.LINEAR, linear)


def test_a_release_other_than_the_patches_were_written_for_warns_once(caplog):
    got = {"megatron-core": "0.20.0", "nvidia-modelopt": "0.47.0"}
    with caplog.at_level("WARNING", logger="recipes.compat"):
        assert upstream.check_versions(version=got.__getitem__) == [
            "megatron-core 0.20.0 (written for 0.19.2)"]
        upstream.check_versions(version=got.__getitem__)
    warned = [r.getMessage() for r in caplog.records if "written for other releases" in
              r.getMessage()]
    assert len(warned) == 1 and "megatron-core 0.20.0 (written for 0.19.2)" in warned[0]
    assert upstream.check_versions() == []  # the pinned stack, as installed here


def test_cpu_adam_is_torchs_fused_kernel_with_the_loops_update():
    """On a CPU megatron builds torch's AdamW without `fused`, and torch then loops over the
    parameters op by op (5x slower at the demo's shapes); train.build_optimizer switches it to
    the fused CPU kernel. Three steps of megatron's optimizer on the same gradients: the same
    parameters as the loop's, to fp32 rounding, and the moments too."""
    from recipes.lib import model as M  # compat.apply(): megatron imports here
    from recipes.lib import runtime, train, train_config

    arch, tokens = small_arch(), torch.randint(0, 100, (2, 32))
    runs = {}
    with runtime.distributed(1, 1):
        for fused in (False, True):
            torch.manual_seed(0)
            model = M.build(arch, dtype="fp32", spec="local", init=True).train()
            init = [p.detach().clone() for p in model.parameters()]
            cfg = train_config.TrainConfig(input="-", data=["-"], train_iters=3, warmup_iters=0,
                                           lr=1e-2)
            ddp, opt, sched = train.build_optimizer(model, cfg)
            groups = opt.optimizer.param_groups
            assert all(g["fused"] for g in groups) and not any(g["foreach"] for g in groups)
            if not fused:
                for g in groups:
                    g.update(fused=None, foreach=False)
            for _ in range(3):
                ddp.zero_grad_buffer()
                opt.zero_grad()
                ddp(tokens, torch.arange(32).expand(2, 32), None, labels=tokens).mean().backward()
                ddp.finish_grad_sync()
                assert opt.step()[0]
                sched.step(increment=1)
            state = opt.optimizer.state
            runs[fused] = [p.detach().clone() for p in model.parameters()] + \
                [state[p]["exp_avg_sq"].clone() for p in model.parameters()]
    assert all((p - q).abs().max() > 1e-4 for p, q in zip(runs[True], init))
    for loop, fast in zip(runs[False], runs[True]):
        torch.testing.assert_close(fast, loop, rtol=1e-5, atol=1e-7)
