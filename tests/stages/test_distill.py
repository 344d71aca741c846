"""Distillation on megatron-core + ModelOpt, tiny models on CPU: it learns, it resumes exactly
after SIGKILL, it never reads a half-written checkpoint, its KD loss is the forward KL, and TP=2 /
PP=2 give the TP=1 numbers."""
import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import distill, export, prune
from recipes.lib import tokens
from tests.conftest import ROOT, TINY, torchrun


@pytest.fixture(scope="module")
def pruned(trained_run):
    """The trained tiny teacher pruned in width (tiny.yaml targets) into <run>/prune."""
    prune.main(["--config", TINY, f"run.dir={trained_run['run']}",
                f"convert.hf_path={trained_run['hf']}"])
    return trained_run


def args(run, out, *extra):
    return ["--config", TINY, f"run.dir={run['run']}", f"convert.hf_path={run['hf']}",
            f"distill.output={out}", *extra]


def metrics(out):
    return [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def losses(rows, key="kd_loss"):
    return {r["step"]: r[key] for r in rows if key in r}


def run_subprocess(argv, expect_kill=False):
    """Run the stage in its own process group, as a scheduler does, and kill the whole group
    afterwards: a SIGKILLed megatron leaves its checkpoint writer's multiprocessing manager
    behind (a scheduler's kill takes the group)."""
    with open(os.devnull, "w") as null, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "recipes.distill", *argv], cwd=ROOT,
                             stdout=null, stderr=err, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            rc = p.wait(timeout=600)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        err.seek(0)
        stderr = err.read()
    assert rc == (-9 if expect_kill else 0), stderr[-5000:]
    return stderr


def hf_test_loss(folder, run):
    m = AutoModelForCausalLM.from_pretrained(folder).eval()
    w = tokens.windows(run["run"] / "data", "test", 64, 8, seed=0)
    with torch.no_grad():
        logits = m(w[:, :-1], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             w[:, 1:].reshape(-1)).item()


def test_distillation_learns_and_beats_the_pruned_student(pruned, tmp_path):
    out = tmp_path / "d"
    distill.main(args(pruned, out, "distill.train_iters=30", "distill.global_batch_size=8",
                      "distill.eval_interval=10", "distill.save_interval=30"))
    rows = metrics(out)
    kd = losses(rows)
    first, last = sum(kd[s] for s in range(1, 6)) / 5, sum(kd[s] for s in range(26, 31)) / 5
    assert last < 0.7 * first, (first, last)
    valid = losses(rows, "valid_kd_loss")
    assert valid[30] < valid[0]
    m = json.loads((out / "manifest.json").read_text())
    assert m["arch"]["hidden_size"] == 48 and not (out / "checkpoints").exists()
    for src, dst in ((pruned["run"] / "prune", tmp_path / "hp"), (out, tmp_path / "hd")):
        export.main(["--config", TINY, f"run.dir={pruned['run']}", f"export.input={src}",
                     f"export.output={dst}"])
    before, after = hf_test_loss(tmp_path / "hp", pruned), hf_test_loss(tmp_path / "hd", pruned)
    teacher = hf_test_loss(pruned["hf"], pruned)
    print(f"held-out loss: teacher {teacher:.3f}, pruned {before:.3f}, distilled {after:.3f}")
    assert after < before


def test_resume_after_sigkill_gives_identical_losses(pruned, tmp_path):
    distill.main(args(pruned, tmp_path / "straight"))  # 8 steps, checkpoints at 4 and 8
    straight = metrics(tmp_path / "straight")
    run_subprocess(args(pruned, tmp_path / "killed", "distill.fault=kill_after:6"),
                   expect_kill=True)
    work = tmp_path / ".killed.tmp"
    assert [p.name for p in (work / "checkpoints").glob("iter_*")] == ["iter_0000004"]
    stderr = run_subprocess(args(pruned, tmp_path / "killed"))
    assert "resumed from" in stderr and "iter_0000004" in stderr
    resumed = metrics(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]  # one clean history
    for key in ("kd_loss", "lm_loss", "valid_kd_loss"):
        a, b = losses(straight, key), losses(resumed, key)
        assert a.keys() == b.keys()
        for s in a:
            assert b[s] == pytest.approx(a[s], abs=1e-6), (key, s)


def test_half_written_checkpoint_is_never_resumed(pruned, tmp_path):
    run_subprocess(args(pruned, tmp_path / "d", "distill.fault=kill_in_save:8"),
                   expect_kill=True)
    ckpts = tmp_path / ".d.tmp" / "checkpoints"
    assert (ckpts / ".iter_0000008.tmp").is_dir()  # the crash left it half-written
    stderr = run_subprocess(args(pruned, tmp_path / "d"))
    assert "iter_0000004 (step 4)" in stderr
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["metrics"]["step"] == 8


def test_changed_global_batch_is_refused_with_the_reason(pruned, tmp_path):
    run_subprocess(args(pruned, tmp_path / "d", "distill.fault=kill_after:5"), expect_kill=True)
    with pytest.raises(Exception, match="global_batch_size: 4 -> 8.*restore them to resume"):
        distill.main(args(pruned, tmp_path / "d", "distill.global_batch_size=8"))


@pytest.mark.parametrize("skip_lm_loss", [True, False])
def test_kd_loss_is_the_forward_kl(pruned, skip_lm_loss):
    """The KD loss our loss function reports equals KL(teacher || student) computed by hand from
    separately computed logits, with the LM loss computed in the same step (the in-place
    cross-entropy trap would break this)."""
    from recipes.lib import checkpoint, runtime
    from recipes.lib.config import load

    run = pruned["run"]
    c = load(TINY, [f"run.dir={run}", f"distill.skip_lm_loss={skip_lm_loss}"],
             stage="distill").distill
    ta, sa = checkpoint.read_arch(run / "convert"), checkpoint.read_arch(run / "prune")
    w = tokens.windows(run / "data", "valid", 64, 2, seed=3)
    batch = {"tokens": w[:, :-1], "labels": w[:, 1:], "loss_mask": torch.ones(2, 64),
             "position_ids": torch.arange(64).expand(2, 64)}
    with runtime.distributed(1, 1):
        from recipes.lib import model as M

        def load_model(arch, stage):
            m = M.build(arch, dtype="fp32", init=False)
            checkpoint.load(m, run / stage / "checkpoint")
            return m.eval()

        t_logits = M.forward_logits(load_model(ta, "convert"), w[:, :-1], ta.vocab_size)
        s_logits = M.forward_logits(load_model(sa, "prune"), w[:, :-1], sa.vocab_size)
        model = distill.distillation_model(load_model(sa, "prune"), load_model(ta, "convert"),
                                           c, sa.vocab_size)
        model.eval()
        step = distill.make_step_fn(model, sa.vocab_size, skip_lm_loss, False)(training=False)
        with torch.no_grad():
            out, loss_func = step(iter([batch]), model)
            total, n, report = loss_func(out)
    lt, ls = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean().item()
    ce = torch.nn.functional.cross_entropy(s_logits.reshape(-1, sa.vocab_size),
                                           w[:, 1:].reshape(-1)).item()
    assert kl > 1e-4  # a real difference between the two models
    assert (report["kd_loss"][0] / report["kd_loss"][1]).item() == pytest.approx(kl, rel=1e-4)
    assert (report["lm_loss"][0] / report["lm_loss"][1]).item() == pytest.approx(ce, rel=1e-5)
    if skip_lm_loss:
        assert total.item() / n.item() == pytest.approx(kl, rel=1e-4)


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_parallel_layouts_match_tp1(pruned, tmp_path, layout):
    base = args(pruned, tmp_path / "one", "distill.train_iters=4", "distill.save_interval=4")
    distill.main(base)
    torchrun("recipes.distill", *args(pruned, tmp_path / "two", "distill.train_iters=4",
                                      "distill.save_interval=4", layout))
    a, b = losses(metrics(tmp_path / "one")), losses(metrics(tmp_path / "two"))
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-3, abs=1e-6), (layout, s, a, b)


def test_fp8_without_transformer_engine_fails_first(pruned, tmp_path):
    with pytest.raises(ValueError, match="precision=fp8 needs Transformer Engine"):
        distill.main(args(pruned, tmp_path / "d", "distill.precision=fp8"))
    assert not (tmp_path / ".d.tmp").exists()
