"""Distillation on megatron-core + ModelOpt, tiny models on CPU: it learns, it resumes exactly
after SIGKILL, it saves and stops on SIGUSR1/SIGTERM (all ranks at one step) and resumes exactly
from there, it never reads a half-written checkpoint, its KD loss is the forward KL, and TP=2 /
PP=2 give the TP=1 numbers."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import distill, export, prune
from recipes.lib import arch, preempt, tokens
from recipes.lib.preempt import FAULT_ENV
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


def start(argv, blocked=(), fault=None):
    """The stage in its own process group, as a scheduler runs it; `blocked`: signals blocked in
    the mask it inherits (a launcher's, kept across exec); `fault`: MINITRON_FAULT (preempt.py)."""
    err = tempfile.TemporaryFile("w+")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        p = subprocess.Popen([sys.executable, "-m", "recipes.distill", *argv], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1",
                                  **({FAULT_ENV: fault} if fault else {})})
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return p, err


def finish(p, err, rc):
    """Wait for it, then kill the whole group: a SIGKILLed megatron leaves its checkpoint
    writer's multiprocessing manager behind (a scheduler's kill takes the group)."""
    try:
        got = p.wait(timeout=600)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    err.seek(0)
    stderr = err.read()
    err.close()
    assert got == rc, stderr[-5000:]
    return stderr


def run_subprocess(argv, rc=0, blocked=(), fault=None):
    return finish(*start(argv, blocked, fault), rc)


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
    t, s = (arch.Arch.from_dict(json.loads((pruned["run"] / r / "manifest.json").read_text())[
        "arch"]) for r in ("convert", "prune"))
    per_token = arch.distill_flops_per_token(t, s, 64)  # the student's 3 passes + the teacher's
    assert per_token > 3 * s.flops_per_token(64)
    for r in rows[1:]:  # one rank: the run's model FLOPs over its step time
        assert r["model_tflops_per_rank"] == pytest.approx(r["tokens_per_s"] * per_token / 1e12)
        assert "mfu" not in r  # a CPU has no listed peak
    m = json.loads((out / "manifest.json").read_text())
    assert m["arch"]["hidden_size"] == 48 and not (out / "checkpoints").exists()
    for src, dst in ((pruned["run"] / "prune", tmp_path / "hp"), (out, tmp_path / "hd")):
        export.main(["--config", TINY, f"run.dir={pruned['run']}", f"export.input={src}",
                     f"export.output={dst}"])
    before, after = hf_test_loss(tmp_path / "hp", pruned), hf_test_loss(tmp_path / "hd", pruned)
    teacher = hf_test_loss(pruned["hf"], pruned)
    print(f"held-out loss: teacher {teacher:.3f}, pruned {before:.3f}, distilled {after:.3f}")
    assert after < before


@pytest.fixture(scope="module")
def straight(pruned, tmp_path_factory):
    """8 uninterrupted steps (checkpoints at 4 and 8): the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight") / "d"
    distill.main(args(pruned, out))
    return out


def assert_same_history(straight, resumed, rel=None):
    """One clean history with the same losses: to 1e-6 (fp32), or `rel` (fp8 on a GPU)."""
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]  # one clean history
    for key in ("kd_loss", "lm_loss", "valid_kd_loss"):
        a, b = losses(straight, key), losses(resumed, key)
        assert a.keys() == b.keys()
        for s in a:
            want = pytest.approx(a[s], rel=rel) if rel else pytest.approx(a[s], abs=1e-6)
            assert b[s] == want, (key, s)


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_losses(pruned, straight, tmp_path):
    run_subprocess(args(pruned, tmp_path / "killed"), rc=-9, fault="kill_after:6")
    work = tmp_path / ".killed.tmp"
    assert [p.name for p in (work / "checkpoints").glob("iter_*")] == ["iter_0000004"]
    stderr = run_subprocess(args(pruned, tmp_path / "killed"))
    assert "resumed from" in stderr and "iter_0000004" in stderr
    assert_same_history(metrics(straight), metrics(tmp_path / "killed"))


def test_recomputing_activations_trains_the_same_run(pruned, straight, tmp_path):
    """recompute_layers keeps less for the backward and gives the same losses (fp32, to 1e-6):
    an uninterrupted run with one of the student's layers recomputed equals `straight` (so it
    is operational: a resume may change it, see the next test). With an intermediate loss
    inside the recomputed layers it is refused (no gradient would reach it)."""
    distill.main(args(pruned, tmp_path / "one", "distill.recompute_layers=1"))
    assert_same_history(metrics(straight), metrics(tmp_path / "one"))
    with pytest.raises(ValueError, match=r"recompute_layers=1: a recomputed layer's output is "
                                         r"first computed without gradients"):
        distill.main(args(pruned, tmp_path / "x", "distill.recompute_layers=1",
                          "distill.intermediate_layer_pairs=[[decoder.layers.0, decoder.layers.1"
                          ", cosine]]"))


def test_finished_run_ignores_operational_changes_but_not_the_seed(pruned, straight):
    """Save cadence, signals and logging cannot change a finished run's result: skipped. A new
    seed can: refused (it would otherwise be silently skipped)."""
    before = (straight / "manifest.json").read_text()
    distill.main(args(pruned, straight, "distill.save_interval=2", "distill.log_interval=3",
                      "distill.preempt_signals=[SIGTERM]", "distill.recompute_layers=8"))
    assert (straight / "manifest.json").read_text() == before
    with pytest.raises(FileExistsError, match="already holds a different distill run"):
        distill.main(args(pruned, straight, "run.seed=7"))


@pytest.mark.slow
def test_signal_saves_that_step_exits_75_and_resumes_exactly(pruned, straight, tmp_path):
    """SIGUSR1 after step 6 (save_interval 4): a checkpoint at 6, exit 75, resume from 6. With
    megatron's distributed optimizer (what a GPU runs at any DP): the standard optimizer's
    losses at DP=1, and its checkpoint resumes exactly. Both runs with run.force=true, as a job
    submitted with it reruns when Slurm requeues it: force redoes a finished stage, it does not
    throw away the unfinished run of the same settings. The first run inherits SIGUSR1 blocked
    (as from a launcher inside a checkpoint save): the stage unblocks what it watches."""
    again = ["distill.optimizer=distributed", "run.force=true"]
    stderr = run_subprocess(args(pruned, tmp_path / "d", *again), fault="signal_after:6",
                            rc=preempt.EXIT_PREEMPTED, blocked=[signal.SIGUSR1])
    assert "SIGUSR1: saved step 6 of 8" in stderr
    ckpts = tmp_path / ".d.tmp" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000004", "iter_0000006"]
    stderr = run_subprocess(args(pruned, tmp_path / "d", *again))
    assert "iter_0000006 (step 6)" in stderr
    assert "run.force=true: continuing the unfinished distill run" in stderr
    assert_same_history(metrics(straight), metrics(tmp_path / "d"))


@pytest.mark.slow
def test_sigterm_from_outside_saves_the_step_it_stops_at(pruned, tmp_path):
    """A real SIGTERM (what a preempting scheduler sends) at an arbitrary moment."""
    p, err = start(args(pruned, tmp_path / "d", "distill.train_iters=400",
                        "distill.save_interval=1000", "distill.eval_interval=1000"))
    rows = tmp_path / ".d.tmp" / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (rows.exists() and len(rows.read_text().splitlines()) >= 3):
        assert p.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stderr = finish(p, err, preempt.EXIT_PREEMPTED)
    last = metrics(tmp_path / ".d.tmp")[-1]["step"]
    assert 2 <= last < 400
    assert f"SIGTERM: saved step {last} of 400" in stderr
    ckpts = list((tmp_path / ".d.tmp" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == [f"iter_{last:07d}"]
    assert (ckpts[0] / "train_state.json").is_file()


@pytest.mark.slow
def test_signal_on_one_rank_stops_all_ranks_at_one_step(pruned, tmp_path):
    """DP=2: only the last rank is signalled after step 3; both save step 3 and stop (no rank
    hangs in the next step's collectives); torchrun's rerun resumes there and finishes."""
    a = args(pruned, tmp_path / "d", "distill.save_interval=100")
    p = torchrun("recipes.distill", *a, ok=False, env={FAULT_ENV: "signal_after:3"})
    assert p.returncode != 0 and "saved step 3 of 8" in p.stderr
    ck = tmp_path / ".d.tmp" / "checkpoints" / "iter_0000003"
    assert {f.name for f in ck.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    p = torchrun("recipes.distill", *a)
    assert "iter_0000003 (step 3)" in p.stderr
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["metrics"]["step"] == 8


@pytest.mark.slow
def test_half_written_checkpoint_is_never_resumed(pruned, tmp_path):
    run_subprocess(args(pruned, tmp_path / "d"), fault="kill_in_save:8",
                   rc=-9)
    ckpts = tmp_path / ".d.tmp" / "checkpoints"
    assert (ckpts / ".iter_0000008.tmp").is_dir()  # the crash left it half-written
    stderr = run_subprocess(args(pruned, tmp_path / "d"))
    assert "iter_0000004 (step 4)" in stderr
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["metrics"]["step"] == 8


def test_changed_global_batch_is_refused_with_the_reason(pruned, tmp_path):
    run_subprocess(args(pruned, tmp_path / "d"), rc=-9, fault="kill_after:5")
    with pytest.raises(Exception, match="global_batch_size: 4 -> 8.*restore them to resume"):
        distill.main(args(pruned, tmp_path / "d", "distill.global_batch_size=8"))
    # run.force=true discards the unfinished run of other settings and starts over
    distill.main(args(pruned, tmp_path / "d", "distill.global_batch_size=8", "distill.train_iters=2",
                      "distill.eval_interval=2", "run.force=true"))
    rows = metrics(tmp_path / "d")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[1]["tokens"] == 8 * 64


@pytest.mark.parametrize("path", ["chunks", "tiles", "modelopt"])
@pytest.mark.parametrize("skip_lm_loss", [True, False])
def test_kd_loss_is_the_forward_kl(pruned, skip_lm_loss, path, monkeypatch):
    """The KD loss our loss function reports equals KL(teacher || student) computed by hand from
    separately computed logits, with the LM loss computed in the same step (the in-place
    cross-entropy trap would break this), on the CPU's chunked losses, the GPU's vocabulary
    tiles (their torch mirror here) and ModelOpt's."""
    from recipes.lib import checkpoint, interop, kd, runtime
    from recipes.lib.config import load

    monkeypatch.setattr(kd, "FUSED", path != "modelopt")
    monkeypatch.setattr(kd, "TILES", path == "tiles")

    run = pruned["run"]
    c = load(TINY, [f"run.dir={run}", f"distill.skip_lm_loss={skip_lm_loss}"],
             stage="distill").distill
    src = {s: interop.open_source(run / s, s, (s,)) for s in ("convert", "prune")}
    ta, sa = src["convert"].arch, src["prune"].arch
    w = tokens.windows(run / "data", "valid", 64, 2, seed=3)
    batch = {"tokens": w[:, :-1], "labels": w[:, 1:], "loss_mask": torch.ones(2, 64),
             "position_ids": torch.arange(64).expand(2, 64)}
    with runtime.distributed(1, 1):
        from recipes.lib import model as M

        def load_model(arch, stage):
            m = M.build(arch, dtype="fp32", init=False)
            checkpoint.load(m, src[stage].weights)
            return m.eval()

        t_logits = M.forward_logits(load_model(ta, "convert"), w[:, :-1], ta.vocab_size)
        s_logits = M.forward_logits(load_model(sa, "prune"), w[:, :-1], sa.vocab_size)
        model, kl_loss = kd.distillation_model(load_model(sa, "prune"),
                                                    load_model(ta, "convert"), c, sa.vocab_size)
        model.eval()
        step = kd.make_step_fn(model, kl_loss, sa.vocab_size, skip_lm_loss,
                                    False)(training=False)
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


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.tp=2 tiles", "parallel.pp=2"])
def test_parallel_layouts_match_tp1(pruned, tmp_path, layout):
    """TP=2 (ModelOpt's vocab-parallel KL, or the vocabulary tiles' all-reduced one as on a GPU)
    and PP=2 train the TP=1 run."""
    base = args(pruned, tmp_path / "one", "distill.train_iters=4", "distill.save_interval=4")
    distill.main(base)
    layout, _, tiles = layout.partition(" ")
    torchrun("recipes.distill", *args(pruned, tmp_path / "two", "distill.train_iters=4",
                                      "distill.save_interval=4", layout),
             env={"MINITRON_KD_TILES": "1" if tiles else "0"})
    a, b = losses(metrics(tmp_path / "one")), losses(metrics(tmp_path / "two"))
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-3, abs=1e-6), (layout, s, a, b)


@pytest.mark.slow
def test_dp2_with_overlapped_gradient_reduction_trains_the_dp1_run(pruned, tmp_path):
    """DP=2, the gradients reduced while the step's last backward runs (the default): the DP=1
    run's losses to 1e-6 and its gradient norms (a reduction missed or counted twice shows
    there); the stage says it overlapped."""
    common = ("distill.train_iters=2", "distill.save_interval=2", "distill.eval_interval=2")
    assert distill.main(args(pruned, tmp_path / "dp1", *common)) == 0
    dp2 = torchrun("recipes.distill", *args(pruned, tmp_path / "dp2", *common))
    assert "gradient reduction overlapped with the backward: 1 bucket(s) over DP=2" in dp2.stderr
    one, two = metrics(tmp_path / "dp1"), metrics(tmp_path / "dp2")
    assert_same_history(one, two)
    norms = [(a["grad_norm"], b["grad_norm"]) for a, b in zip(one, two) if "grad_norm" in a]
    assert len(norms) == 2 and all(b == pytest.approx(a, rel=1e-5) for a, b in norms)


def test_fp8_without_transformer_engine_fails_first(pruned, tmp_path):
    with pytest.raises(ValueError, match="precision=fp8 needs Transformer Engine"):
        distill.main(args(pruned, tmp_path / "d", "distill.precision=fp8"))
    assert not (tmp_path / ".d.tmp").exists()


def test_out_of_gpu_memory_names_the_estimate_and_the_fixes(pruned, tmp_path, monkeypatch):
    """A GPU that runs out of memory mid-training (torch.OutOfMemoryError, raised here in the
    loop's place): one error with the estimated peak for the layout and the settings that lower
    it, the work folder kept for a resume."""
    from recipes.lib import train

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")

    monkeypatch.setattr(train, "train", oom)
    with pytest.raises(RuntimeError) as e:
        distill.main(args(pruned, tmp_path / "d", "distill.micro_batch_size=2"))
    src = {r: json.loads((pruned["run"] / r / "manifest.json").read_text())["arch"]
           for r in ("convert", "prune")}
    est = arch.training_memory(arch.Arch.from_dict(src["convert"]),
                               arch.Arch.from_dict(src["prune"]), 2 * 64, 1, 1, 1) / 2**30
    assert str(e.value) == (
        "distill ran out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB). "
        f"Estimated peak at tp=1 pp=1 dp=1, 2 x 64 tokens per micro-batch: {est:.1f} GiB per "
        "GPU; lower it with distill.micro_batch_size=1, distill.recompute_layers="
        f"{src['prune']['num_layers']}, distill.precision_aware_optimizer=true, a larger "
        "parallel.pp or parallel.tp, a shorter distill.seq_length (make plan lists the layouts "
        "that fit)")
    assert (tmp_path / ".d.tmp" / "run.json").is_file()


def test_a_nan_loss_stops_the_run_keeping_its_checkpoints(pruned, tmp_path, monkeypatch):
    """A loss that turns NaN (step 5 here; a diverged run or a NaN in an input on a cluster)
    stops training at that step, naming it and the newest checkpoint, which stays for a
    resume; megatron alone would go on stepping."""
    from recipes.lib import train

    real, calls = train.reduce_report, []

    def nan_at_step_5(reports):
        rep = real(reports)
        calls.append(1)  # step 0 validates, step 4 trains and validates
        return {**rep, "kd_loss": float("nan")} if len(calls) == 7 else rep

    monkeypatch.setattr(train, "reduce_report", nan_at_step_5)
    with pytest.raises(RuntimeError, match=r"^step 5: kd_loss = nan: the run diverged, or the "
                                           r"teacher, the student or the data holds NaN / inf "
                                           r"values; its newest checkpoint is iter_0000004"):
        distill.main(args(pruned, tmp_path / "d"))
    assert [json.loads(x)["step"] for x in (tmp_path / ".d.tmp" / "logs" / "metrics.jsonl")
            .read_text().splitlines()] == [0, 1, 2, 3, 4, 5]
    assert (tmp_path / ".d.tmp" / "checkpoints" / "iter_0000004").is_dir()


@pytest.mark.slow
def test_slurm_script_requeues_on_75_and_the_rerun_finishes(pruned, tmp_path):
    """The rendered distill batch script, run by bash with stand-ins for srun (one task, no
    container) and scontrol: the real stage saves on the signal and exits 75, the script asks
    for a requeue and exits 0; the 'requeued' run resumes and finishes without a requeue."""
    from recipes import launch
    from recipes.lib.cluster import ClusterConfig

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                               'export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0\n'
                               'exec "$@"\n')
    (bin_ / "scontrol").write_text('#!/bin/bash\necho "$*" >> "$SCONTROL_LOG"\n'
                                   '[ "$1" = show ] && echo 127.0.0.1\nexit 0\n')
    (bin_ / "python").write_text(f'#!/bin/bash\nexec {sys.executable} "$@"\n')
    for f in ("srun", "scontrol", "python"):
        (bin_ / f).chmod(0o755)
    out = tmp_path / "d"
    cluster = ClusterConfig(gpus_per_node=1, nodes={"distill": 1},
                                   layout={"distill": {"tp": 1}})
    script = launch.write_job("distill", cluster, TINY, str(tmp_path), args(pruned, out)[2:])
    log = tmp_path / "scontrol.log"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "SCONTROL_LOG": str(log),
           "SLURM_JOB_ID": str(os.getpid() % 20000), "SLURM_JOB_NODELIST": "node1",
           "OMP_NUM_THREADS": "1"}

    def sbatch(fault=None):
        launch.write_job("distill", cluster, TINY, str(tmp_path), args(pruned, out)[2:])
        return subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True,
                              env={**env, **({FAULT_ENV: fault} if fault else {})}, timeout=600)

    p = sbatch("signal_after:5")
    assert p.returncode == 0, p.stderr[-4000:]
    assert "saved step 5 of 8" in p.stderr and "requeue" in p.stdout
    assert log.read_text().splitlines()[-1] == f"requeue {env['SLURM_JOB_ID']}"
    p = sbatch()
    assert p.returncode == 0 and "iter_0000005 (step 5)" in p.stderr, p.stderr[-4000:]
    assert "requeue" not in log.read_text().splitlines()[-1]
    assert json.loads((out / "manifest.json").read_text())["metrics"]["step"] == 8


@pytest.mark.slow
def test_the_log_is_quiet_but_keeps_progress_summaries_and_real_warnings(pruned, tmp_path):
    """At INFO the expected upstream warnings and INFO chatter (recipes/lib/quiet.py) are gone;
    the progress bar, the stage's own lines and an unexpected upstream warning remain; DEBUG
    brings the expected ones back."""
    from recipes.lib import quiet

    def log(out, *extra):
        return run_subprocess(args(pruned, out, "distill.train_iters=2",
                                   "distill.save_interval=2", *extra))

    text = log(tmp_path / "d")
    assert "distill: 100%" in text and "INFO recipes.lib.train_stage: distill" in text
    assert "Warning" not in text and "warnings.warn" not in text, text[-3000:]
    assert "INFO megatron" not in text and "INFO lm_eval" not in text
    for _prefix, pattern, _why in quiet.EXPECTED_LOGS:
        assert not __import__("re").search(pattern, text)
    debug = log(tmp_path / "debug", "run.log_level=DEBUG")
    assert "Transformer Engine and Apex are not installed" in debug
    assert "GPTModel IS DEPRECATED" in debug
    # an unexpected warning from upstream still shows, through the filters installed on import
    out = subprocess.run([sys.executable, "-c", "import recipes, warnings; "
                          "warnings.warn('Transformer Engine exploded')"], cwd=ROOT,
                         capture_output=True, text=True)
    assert "Transformer Engine exploded" in out.stderr


def test_precision_auto_follows_the_machine_and_is_recorded(pruned, tmp_path, monkeypatch):
    """precision=auto on a CPU without native bf16 (flags and probe stood in for) trains in fp32,
    says why in the manifest; a later run in the same run directory on a machine that would
    choose bf16 keeps fp32 (one choice per run)."""
    from recipes.lib import runtime

    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f"})
    monkeypatch.setattr(runtime, "bf16_matmul_speedup", lambda *a, **k: 0.12)
    run = tmp_path / "run"  # its own run directory: the choice is kept there
    a = ["--config", TINY, f"run.dir={run}", f"distill.input={pruned['run'] / 'prune'}",
         f"distill.teacher={pruned['run'] / 'convert'}", f"distill.data=[{pruned['run'] / 'data'}]",
         "distill.precision=auto", "distill.train_iters=2", "distill.eval_interval=2"]
    assert distill.main(a) == 0
    m = json.loads((run / "distill" / "manifest.json").read_text())
    assert m["precision"] == "fp32" == m["dtype"] == m["teacher"]["precision"]
    assert "without native bf16" in m["precision_auto"]["why"]
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"amx_bf16"})
    monkeypatch.setattr(runtime, "bf16_matmul_speedup", lambda *a, **k: 3.0)
    assert distill.main([*a, "distill.output=" + str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["precision"] == "fp32"
