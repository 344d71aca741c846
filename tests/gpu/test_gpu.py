"""GPU-only checks (skipped without CUDA): TE spec vs local spec logits, the first distillation
steps' KD loss on the GPU (bf16, fp8) vs the CPU local-spec value on the same tiny models and
data, the benchmark path, save-on-signal + exact resume with CUDA state, and prune's
tournament with the teacher-logit cache in bf16."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.lib.runtime import have_te
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.gpu


def converted_logits(hf, tmp_path, builds: dict) -> dict:
    """The converted model's bf16 logits for each {name: M.build keywords} and the config each
    was built with (bf16: TE runs fp32 matmuls as TF32, so an fp32 comparison would measure
    TF32, not the spec)."""
    from recipes import convert
    from recipes.lib import checkpoint, interop, runtime

    convert.main(["--config", TINY, f"run.dir={tmp_path}", f"convert.hf_path={hf}"])
    src = interop.open_source(tmp_path / "convert", "convert", ("convert",))
    tokens = torch.randint(0, 90, (2, 32))
    out = {}
    with runtime.distributed(1, 1):
        from recipes.lib import model as M

        for name, kw in builds.items():
            m = M.build(src.arch, dtype="bf16", init=False, **kw)
            checkpoint.load(m, src.weights)
            out[name] = M.forward_logits(m, tokens, src.arch.vocab_size), m.config
    return out


@pytest.mark.timeout(120)
@pytest.mark.skipif(not have_te(), reason="needs Transformer Engine")
@pytest.mark.parametrize("variant", ["gqa", "tied", "qwen2", "qwen3", "qwen3_moe", "mixtral"])
def test_te_spec_matches_local_spec(variant, tmp_path):
    """Llama with GQA, tied embeddings, Qwen2's QKV bias, Qwen3's Q/K norms, and the mixtures of
    experts (TE's SequentialMLP experts, the all-to-all dispatcher; the tiny models' routers are
    drawn wide, so bf16 does not flip a token's experts): the same logits through the TE spec as
    through the local spec (bf16 tolerance)."""
    from tests.tiny_models import write_tiny_llama

    hf = write_tiny_llama(tmp_path / "hf", variant)
    out = converted_logits(hf, tmp_path / "run", {"te": {"spec": "te"}, "local": {"spec": "local"}})
    torch.testing.assert_close(out["te"][0], out["local"][0], atol=5e-2, rtol=3e-2)


# relative tolerance of the GPU's KD losses against the CPU's fp32 local-spec values: bf16
# weights and matmuls (~3 significant digits), fp8 matmuls on top
KD_RTOL = {"bf16": 5e-2, "fp8": 1.5e-1}


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_first_kd_losses_match_the_cpu(trained_run, tmp_path, precision):
    """The held-out KD loss before training and the first two steps' KD losses, on the GPU with
    the spec `auto` picks (TE where installed) in `precision`, equal the CPU's fp32 local-spec
    values on the same pruned student, teacher and data."""
    if precision == "fp8" and not have_te():
        pytest.skip("fp8 needs Transformer Engine")
    import os

    from recipes import prune
    from tests.stages.test_distill import args, metrics

    prune.main(["--config", TINY, f"run.dir={trained_run['run']}",
                f"convert.hf_path={trained_run['hf']}"])
    short = ["distill.train_iters=2", "distill.eval_interval=2"]
    cpu = subprocess.run([sys.executable, "-m", "recipes.distill",
                          *args(trained_run, tmp_path / "cpu", *short, "distill.spec=local",
                                "distill.precision=fp32")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    gpu = subprocess.run([sys.executable, "-m", "recipes.distill",
                          *args(trained_run, tmp_path / "gpu", *short,
                                f"distill.precision={precision}")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert gpu.returncode == 0, gpu.stderr[-3000:]
    manifest = json.loads((tmp_path / "gpu" / "manifest.json").read_text())
    assert manifest["precision"] == precision
    assert (manifest["fp8"] or {}).get("fp8") == ("hybrid" if precision == "fp8" else None)
    want, got = metrics(tmp_path / "cpu"), metrics(tmp_path / "gpu")
    pairs = [(want[0]["valid_kd_loss"], got[0]["valid_kd_loss"])]  # step 0: before any update
    pairs += [(w["kd_loss"], g["kd_loss"]) for w, g in zip(want[1:3], got[1:3])]
    for w, g in pairs:
        assert g == pytest.approx(w, rel=KD_RTOL[precision]), (precision, pairs)


@pytest.mark.timeout(300)  # five processes, each importing TE and megatron: 170 s was too
def test_benchmark_runs_on_tiny_shapes(tmp_path):  # short beside three other tests on the H200
    """bench/gpu_distill.py's every run on tiny shapes (seconds each): finite KD losses, the
    fp8 runs' first loss near TE bf16's (same weights, same batches), the TE runs fused and on
    TE's attention, the GPU's optimizer distributed."""
    runs = "local-bf16,te-bf16,te-fp8,te-fp8-bf16-edges,te-fp8-teacher-fp8"
    p = subprocess.run([sys.executable, "bench/gpu_distill.py", "--tiny", "--json",
                        str(tmp_path / "o.json"), "--seqs", "128", "--runs", runs,
                        "--warmup", "1", "--steps", "2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=290)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "o.json").read_text())["results"]["128"]
    for name, r in res.items():
        if "skipped" in r:
            assert not have_te() and name.startswith("te-"), (name, r)
            continue
        assert all(x == x and x > 0 for x in r["kd_loss"]), (name, r["kd_loss"])
        assert r["optimizer"] == "distributed"
        if name.startswith("te-"):
            assert r["fusions"] == {"apply_rope_fusion": True, "bias_activation_fusion": True,
                                    "bias_dropout_fusion": True}
            assert isinstance(r["attention"], dict), r["attention"]
            assert r["kd_loss"][0] == pytest.approx(res["te-bf16"]["kd_loss"][0], rel=0.1)
    if have_te():
        assert res["te-fp8-bf16-edges"]["fp8"]["num_layers_at_start_in_bf16"] == 1


@pytest.mark.timeout(120)
@pytest.mark.skipif(not have_te(), reason="needs Transformer Engine")
def test_te_fusions_keep_the_logits(tmp_path):
    """The fused RoPE, SwiGLU and residual add the TE spec runs with on a GPU (model.fusions)
    give the unfused logits (bf16 tolerance)."""
    from recipes.lib import model as M
    from tests.tiny_models import write_tiny_llama

    off = dict.fromkeys(M.fusions("te"), False)
    assert off, "no fusions on a GPU with TE"
    out = converted_logits(write_tiny_llama(tmp_path / "hf", "gqa"), tmp_path / "run",
                           {"fused": {"spec": "te"}, "unfused": {"spec": "te", **off}})
    assert out["fused"][1].apply_rope_fusion is True
    assert out["unfused"][1].apply_rope_fusion is False
    torch.testing.assert_close(out["fused"][0], out["unfused"][0], atol=5e-2, rtol=3e-2)


@pytest.mark.timeout(150)
@pytest.mark.skipif(not have_te(), reason="needs Transformer Engine")
def test_precision_aware_optimizer_trains_like_the_standard_one(trained_run, tmp_path):
    """bf16 distillation with megatron's precision-aware optimizer (TE FusedAdam, fp32 master
    weights as bf16 + 16-bit remainders) follows the distributed optimizer's loss history
    (bf16 tolerance: the weights are truncated, not rounded, from the master)."""
    from recipes import distill, prune
    from tests.stages.test_distill import args, metrics

    prune.main(["--config", TINY, f"run.dir={trained_run['run']}",
                f"convert.hf_path={trained_run['hf']}"])
    short = ["distill.train_iters=4", "distill.eval_interval=4", "distill.precision=bf16"]
    distill.main(args(trained_run, tmp_path / "std", *short))
    distill.main(args(trained_run, tmp_path / "pao", *short,
                      "distill.precision_aware_optimizer=true"))
    std, pao = metrics(tmp_path / "std"), metrics(tmp_path / "pao")
    for a, b in zip(std[1:], pao[1:]):
        assert b["kd_loss"] == pytest.approx(a["kd_loss"], rel=3e-2), (std, pao)


@pytest.mark.timeout(150)
@pytest.mark.skipif(not have_te(), reason="needs Transformer Engine")
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_recompute_under_te_trains_like_without(trained_run, tmp_path, precision):
    """Activation recompute under TE (megatron's checkpoint in bf16, TE's te_checkpoint in fp8)
    follows the same loss history as storing everything."""
    from recipes import distill, prune
    from tests.stages.test_distill import args, metrics

    prune.main(["--config", TINY, f"run.dir={trained_run['run']}",
                f"convert.hf_path={trained_run['hf']}"])
    short = ["distill.train_iters=4", "distill.eval_interval=4", f"distill.precision={precision}"]
    distill.main(args(trained_run, tmp_path / "all", *short))
    distill.main(args(trained_run, tmp_path / "rc", *short, "distill.recompute_layers=8"))
    stored, recomputed = metrics(tmp_path / "all"), metrics(tmp_path / "rc")
    for a, b in zip(stored[1:], recomputed[1:]):
        assert b["kd_loss"] == pytest.approx(a["kd_loss"], rel=1e-2), (stored, recomputed)


def test_signal_save_and_resume_on_gpu(trained_run, tmp_path):
    """On CUDA the RNG state includes megatron's CUDA tracker and the optimizer state lives on
    the GPU: save on SIGUSR1 at step 6, resume, and match an uninterrupted run (tiny, fp32)."""
    from recipes import distill, prune
    from tests.stages.test_distill import args, assert_same_history, metrics, run_subprocess

    prune.main(["--config", TINY, f"run.dir={trained_run['run']}",
                f"convert.hf_path={trained_run['hf']}"])
    distill.main(args(trained_run, tmp_path / "straight"))
    stderr = run_subprocess(args(trained_run, tmp_path / "d"), rc=75, fault="signal_after:6")
    if os.environ.get("OUT"):  # what the stage found of its signals (came blocked, replaced)
        (Path(os.environ["OUT"]) / "signals.json").write_text(json.dumps(
            [x for x in stderr.splitlines() if "SIGUSR1" in x or "SIGTERM" in x]))
    stderr = run_subprocess(args(trained_run, tmp_path / "d"))
    assert "iter_0000006 (step 6)" in stderr
    assert_same_history(metrics(tmp_path / "straight"), metrics(tmp_path / "d"))


def test_tournament_teacher_cache_on_gpu(trained_run, tmp_path):
    """prune's tournament on the GPU in bf16: the teacher's logits recorded once (full
    vocabulary, and top-K under a disk budget) give the online teacher's KD and LM losses."""
    import os

    from recipes import prune
    from tests.stages.test_search import NO_SIZES, SEARCH

    run, res = trained_run["run"], {}
    search = SEARCH.replace("top_k: 3", "top_k: 2")
    for name, cache in (("cached", "teacher_cache: true"), ("online", "teacher_cache: false"),
                        ("top_k", "teacher_cache_max_gb: 0.001")):
        out = tmp_path / name
        assert prune.main(["--config", TINY, f"run.dir={run}", f"prune.output={out}", *NO_SIZES,
                           "prune.target_params=0.85", "prune.dtype=bf16",
                           "distill.precision=bf16", "prune.search=" + search % (
                               f", tournament_steps: 3, {cache}")]) == 0
        res[name] = json.loads((out / "search.json").read_text())
    found = {n: [(c["tournament_kd_loss"], c["tournament_lm_loss"]) for c in r["candidates"]]
             for n, r in res.items()}
    found["cache"] = {n: r["tournament"]["teacher_cache"] for n, r in res.items()}
    if os.environ.get("OUT"):  # scripts/gpu_check.sh's output folder
        (Path(os.environ["OUT"]) / "tournament_cache.json").write_text(json.dumps(found))
    assert found["cache"]["cached"]["encoding"] == "full"
    assert found["cache"]["top_k"]["encoding"] == "top-k"
    for (kc, lc), (ko, lo), (kt, lt) in zip(found["cached"], found["online"], found["top_k"]):
        assert kc == pytest.approx(ko, rel=1e-3) and lc == pytest.approx(lo, rel=1e-3)
        assert kt == pytest.approx(ko, rel=2e-2) and lt == pytest.approx(lo, rel=1e-3)


@pytest.mark.timeout(300)
@pytest.mark.skipif(not have_te(), reason="needs Transformer Engine")
def test_fp8_output_reloads_into_te_resumes_exactly_and_exports(trained_run, tmp_path):
    """fp8 (tensorwise) distillation under TE: a SIGUSR1 save + resume equals an uninterrupted
    run; its output loads into a TE model and into a local-spec model for the HF export, whose
    logits equal the TE model's (bf16 tolerance)."""
    from recipes import distill, export, prune
    from recipes.lib import checkpoint, interop, runtime
    from tests.stages.test_distill import args, assert_same_history, metrics, run_subprocess

    prune.main(["--config", TINY, f"run.dir={trained_run['run']}",
                f"convert.hf_path={trained_run['hf']}"])
    fp8 = ["distill.precision=fp8", "distill.fp8_recipe=tensorwise"]
    distill.main(args(trained_run, tmp_path / "straight", *fp8))
    run_subprocess(args(trained_run, tmp_path / "d", *fp8), rc=75, fault="signal_after:6")
    run_subprocess(args(trained_run, tmp_path / "d", *fp8))
    assert_same_history(metrics(tmp_path / "straight"), metrics(tmp_path / "d"), rel=1e-3)
    assert export.main(["--config", TINY, f"run.dir={trained_run['run']}",
                        f"export.input={tmp_path / 'd'}", f"export.output={tmp_path / 'hf'}",
                        "export.dtype=bf16", "export.parity_atol=5e-2"]) == 0
    src = interop.open_source(tmp_path / "d", "distill", ("distill",))
    tokens = torch.randint(0, 90, (2, 32))
    with runtime.distributed(1, 1):
        from recipes.lib import model as M

        m = M.build(src.arch, dtype="bf16", spec="te", init=False)
        checkpoint.load(m, src.weights)  # TE's extra state: none written by tensorwise
        te = M.forward_logits(m, tokens, src.arch.vocab_size)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        got = hf(tokens.cuda()).logits.float().cpu()
    torch.testing.assert_close(got[..., :src.arch.vocab_size], te, atol=1e-1, rtol=5e-2)


@pytest.mark.timeout(240)
@pytest.mark.skipif(not have_te(), reason="needs Transformer Engine")
def test_prune_with_te_keeps_the_local_spec_channels(trained_run, tmp_path):
    """Minitron pruning measured through the TE spec and through the local spec keeps the same
    heads, neurons and channels (the importance rankings' top sets), or says how many differ."""
    import os

    from recipes import prune

    kept = {}
    for spec in ("te", "local"):
        out = tmp_path / spec
        assert prune.main(["--config", TINY, f"run.dir={trained_run['run']}",
                           f"prune.output={out}", f"prune.spec={spec}", "prune.dtype=bf16"]) == 0
        imp = torch.load(out / "importance.pt", weights_only=False)
        arch = json.loads((out / "manifest.json").read_text())["arch"]
        kept[spec] = {
            "channels": set(imp["channels"].argsort(descending=True)[:arch["hidden_size"]]
                            .tolist()),
            "neurons": {k: set(v.argsort(descending=True)[:arch["ffn_hidden_size"]].tolist())
                        for k, v in imp["neurons"].items()}}
    same_channels = len(kept["te"]["channels"] & kept["local"]["channels"])
    same_neurons = sum(len(kept["te"]["neurons"][k] & kept["local"]["neurons"][k])
                       for k in kept["te"]["neurons"])
    total_neurons = sum(len(v) for v in kept["te"]["neurons"].values())
    found = {"channels_same": same_channels, "channels": len(kept["te"]["channels"]),
             "neurons_same": same_neurons, "neurons": total_neurons}
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "prune_te_vs_local.json").write_text(json.dumps(found))
    assert same_channels >= 0.95 * len(kept["te"]["channels"]), found
    assert same_neurons >= 0.95 * total_neurons, found


@pytest.mark.timeout(240)
def test_teacher_correction_export_and_evaluate_on_gpu(trained_run, tmp_path):
    """The stages no other GPU test runs: teacher correction in bf16 under the resolved spec (TE
    where installed), the HF export of its output, and evaluate on the GPU (held-out loss,
    generation, speed): the loss within bf16 tolerance of the CPU's fp32 value for the same
    export. (evaluate computed on the CPU on a GPU machine until 2026-12-04.)"""
    from recipes import evaluate, export, teacher_correction
    from tests.stages.test_distill import metrics

    a = ["--config", TINY, f"run.dir={trained_run['run']}", f"convert.hf_path={trained_run['hf']}"]
    tc, hf = tmp_path / "tc", tmp_path / "hf"
    assert teacher_correction.main([*a, f"teacher_correction.output={tc}",
                                    "teacher_correction.precision=bf16"]) == 0
    rows = metrics(tc)
    assert all(torch.isfinite(torch.tensor(r["lm_loss"])) for r in rows if "lm_loss" in r)
    assert all(isinstance(r["grad_norm"], float) for r in rows if "grad_norm" in r)
    assert export.main([*a, f"export.input={tc}", f"export.output={hf}", "export.dtype=bf16",
                        "export.parity_atol=5e-2"]) == 0
    ev = [f"evaluate.models={{corrected: {hf}}}", "evaluate.include=[corrected]",
          "evaluate.reference=corrected", "evaluate.speed=true", "evaluate.speed_batch_sizes=[1]",
          "evaluate.speed_repeats=1"]
    assert evaluate.main([*a, f"evaluate.output={tmp_path / 'gpu'}", *ev]) == 0
    cpu = subprocess.run([sys.executable, "-m", "recipes.evaluate", *a, *ev,
                          f"evaluate.output={tmp_path / 'cpu'}", "evaluate.dtype=fp32"],
                         cwd=ROOT, capture_output=True, text=True, timeout=200,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    g, c = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("gpu", "cpu"))
    assert (g["device"], g["dtype"], c["device"], c["dtype"]) == ("cuda", "bf16", "cpu", "fp32")
    assert g["speed"]["corrected"]["device"].startswith("cuda")
    assert g["generations"]["corrected"] and c["generations"]["corrected"]
    assert g["heldout"]["corrected"]["loss"] == pytest.approx(
        c["heldout"]["corrected"]["loss"], rel=2e-2)


@pytest.mark.timeout(120)
def test_tile_kernel_at_llama3_vocab_matches_fp64():
    """The Triton kernel of recipes/lib/kd_tiles.py at Llama-3's 128,256 columns (63 tiles a
    row), bf16 logits, T = 2, the KL and the LM loss both trained, a loss mask: the losses
    against fp64, the gradient within a bf16 rounding of fp64's, masked rows exactly zero."""
    from recipes.lib import kd_tiles

    if not kd_tiles.triton_ready():
        pytest.skip("needs Triton")
    n, vocab = 1024, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    s = (torch.randn(n, vocab, device="cuda", generator=g) * 3).bfloat16().requires_grad_()
    t = (torch.randn(n, vocab, device="cuda", generator=g) * 3).bfloat16()
    y = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    mask = (torch.rand(n, device="cuda", generator=g) > 0.25).float()
    kl, nll = kd_tiles.tiled_losses(s, t, y, vocab, 2.0)
    ((0.7 * kl + 0.3 * nll) * mask).sum().backward()
    s64 = s.detach().double().requires_grad_()
    ls, lt = (s64 / 2).log_softmax(1), (t.double() / 2).log_softmax(1)
    kl64 = (lt.exp() * (lt - ls)).sum(1)
    nll64 = -s64.log_softmax(1).gather(1, y[:, None]).squeeze(1)
    ((0.7 * kl64 + 0.3 * nll64) * mask.double()).sum().backward()
    torch.testing.assert_close(kl.double(), kl64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll.double(), nll64.detach(), rtol=1e-5, atol=1e-5)
    assert (s.grad[mask == 0] == 0).all()
    torch.testing.assert_close(s.grad.double(), s64.grad.bfloat16().double(), rtol=2 ** -7,
                               atol=1e-8)
