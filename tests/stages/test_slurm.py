"""The cluster path on a real Slurm (Debian's slurmctld/slurmd 22.05 on localhost, started by
scripts/slurm/local_cluster.sh; bare-metal mode, CPU): the tiny chain submitted by
`make all LAUNCH=slurm` runs in dependency order and its export has parity; a distill job whose
time limit is shorter than its work is signalled by Slurm, saves, is requeued and resumes from
that step until it finishes, with the export waiting for it; a failing stage cancels the jobs
after it and publishes nothing. Skipped where the Slurm binaries are missing (.ci/run installs
them)."""
import json
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from tests.conftest import ROOT, TINY
from tests.corpus import write_corpus

SBIN = "/usr/sbin"
HAVE_SLURM = all(shutil.which(b, path=f"{os.environ.get('PATH', '')}:{SBIN}")
                 for b in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged"))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_SLURM, reason="Slurm is not installed here (Debian: "
                                "apt-get install slurmctld slurmd slurm-client munge)")]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 65000:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", p + 1))
                    return p
                except OSError:
                    continue
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "LOCAL_SLURM_DIR": str(d), "LOCAL_SLURM_PORT": str(free_port_pair()),
           "PATH": f"{os.environ['PATH']}:{SBIN}"}
    script = ["bash", str(ROOT / "scripts" / "slurm" / "local_cluster.sh")]
    p = subprocess.run([*script, "up"], env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    conf = re.search(r"export SLURM_CONF=(\S+)", p.stdout).group(1)
    yield {**env, "SLURM_CONF": conf}
    subprocess.run([*script, "down"], env=env, timeout=60)


def job(env, job_id) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                         text=True, check=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait(env, ids, timeout) -> dict:
    """Poll until every job ended; returns {id: [states seen, in order]}."""
    seen = {i: [] for i in ids}
    deadline = time.time() + timeout
    while True:
        for i in ids:
            st = job(env, i)["JobState"]
            if not seen[i] or seen[i][-1] != st:
                seen[i].append(st)
        if all(s[-1] in DONE for s in seen.values()):
            return seen
        assert time.time() < deadline, f"jobs still running after {timeout} s: {seen}"
        time.sleep(2)


def submit(env, run, hf, *extra, fault=None) -> dict:
    """`make all LAUNCH=slurm` on the tiny recipe (`fault`: MINITRON_FAULT, which the jobs
    inherit from the submitting environment); returns {stage: job id}."""
    args = " ".join([f"run.dir={run}", f"convert.hf_path={hf}", *extra])
    p = subprocess.run(["make", "all", "LAUNCH=slurm", f"RECIPE={TINY}", f"ARGS={args}"],
                       cwd=ROOT, env={**env, **({"MINITRON_FAULT": fault} if fault else {})},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return dict(re.findall(r"^(\w+): job (\d+)$", p.stdout, re.M))


def log(run, stage, job_id) -> str:
    return (run / "slurm" / f"{stage}-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def chain(slurm, hf_models, tmp_path_factory):
    base = tmp_path_factory.mktemp("chain")
    corpus = write_corpus(base / "corpus")
    run = base / "run"
    ids = submit(slurm, run, hf_models["gqa"], f"data.input={corpus}",
                 "'evaluate.include=[teacher,distilled]'")  # the chain exports no pruned model
    return {"run": run, "hf": hf_models["gqa"], "ids": ids,
            "states": wait(slurm, list(ids.values()), 600)}


def test_the_chain_runs_in_dependency_order_with_parity(slurm, chain):
    ids, run = chain["ids"], chain["run"]
    assert list(ids) == ["data", "convert", "prune", "distill", "export", "evaluate", "report"]
    infos = {s: job(slurm, i) for s, i in ids.items()}
    assert all(i["JobState"] == "COMPLETED" for i in infos.values()), chain["states"]
    stages = list(ids)
    for prev, cur in zip(stages, stages[1:]):  # each job started after the one before ended
        assert infos[cur]["StartTime"] >= infos[prev]["EndTime"], (prev, cur)
        assert f"afterok:{ids[prev]}" in infos[cur].get("Dependency", "") or \
            infos[cur].get("Dependency") == "(null)"  # slurmctld clears it once satisfied
    for s, i in ids.items():  # each job's log where the README says
        assert f"job {i} (restart 0)" in log(run, s, i)
        assert (run / s / "manifest.json").is_file()
    assert json.loads((run / "export" / "manifest.json").read_text())["metrics"][
        "parity_max_abs_diff"] < 1e-4
    p = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "recipes.launch",
                        "--config", TINY, "--status", f"run.dir={run}"], cwd=ROOT, env=slurm,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for s, i in ids.items():
        assert f"| {s} | {i} | COMPLETED | None | 0 | 0:0 | yes |" in p.stdout


STEPS, STEP_MS = 240, 250  # see the test below


@pytest.mark.timeout(1500)
def test_time_limit_signal_saves_requeues_and_resumes(slurm, chain):
    """distill: STEPS steps under a 2-minute limit with USR1 60 s before it: it saves at the
    current step, exits 75, the batch script requeues it, the rerun resumes from that step,
    until done; the export waits and has parity. Slurm may send the signal up to 60 s early
    (its resolution), so 0-60 s after a start (seen: 35-45 s). Each step of the first run
    lasts at least STEP_MS (a test fault), so its training, 60 s, outlasts the signal on any
    machine; the resumed run goes at full speed and finishes in seconds: one restart (with a
    fixed 2,500 steps unpaced: none on a fast host, five, 8.6 min, on a slow one; with every
    run paced, one or two, 118-162 s). A busy machine may need more, hence the long timeout."""
    run = chain["run"]
    ids = submit(slurm, run, chain["hf"], "cluster.stages=[distill,export]",
                 "cluster.time.distill=00:02:00", f"distill.output={run}/distill_pre",
                 f"distill.train_iters={STEPS}", "distill.log_interval=100",
                 "distill.eval_interval=100000", "distill.save_interval=100000",
                 f"export.input={run}/distill_pre", f"export.output={run}/export_pre",
                 fault=f"step_ms:{STEP_MS}")
    states = wait(slurm, list(ids.values()), 1400)
    d, e = job(slurm, ids["distill"]), job(slurm, ids["export"])
    assert d["JobState"] == e["JobState"] == "COMPLETED", states
    assert int(d["Restarts"]) >= 1, states
    text = log(run, "distill", ids["distill"])  # --open-mode=append: every run's output
    saved = [int(x) for x in re.findall(rf"saved step (\d+) of {STEPS}", text)]
    resumed = [int(x) for x in re.findall(r"iter_(\d+) \(step \d+\)", text)]
    assert saved and resumed == saved[:len(resumed)] and all(s > 0 for s in saved), text[-3000:]
    for r in range(1, int(d["Restarts"]) + 1):
        assert f"job {ids['distill']} (restart {r})" in text
    assert json.loads((run / "distill_pre" / "manifest.json").read_text())["metrics"][
        "step"] == STEPS
    assert e["StartTime"] >= d["EndTime"]
    assert json.loads((run / "export_pre" / "manifest.json").read_text())["metrics"][
        "parity_max_abs_diff"] < 1e-4


def test_a_failing_stage_cancels_what_follows_and_publishes_nothing(slurm, chain):
    run = chain["run"]
    ids = submit(slurm, run, chain["hf"], "cluster.stages=[distill,export]",
                 f"distill.output={run}/distill_bad", "distill.train_iters=0",
                 f"export.input={run}/distill_bad", f"export.output={run}/export_bad")
    wait(slurm, list(ids.values()), 300)
    d, e = job(slurm, ids["distill"]), job(slurm, ids["export"])
    assert d["JobState"] == "FAILED" and e["JobState"] == "CANCELLED"
    assert e["Reason"] == "DependencyNeverSatisfied"
    assert "train_iters=0 must be >= 1" in log(run, "distill", ids["distill"])
    assert not (run / "distill_bad").exists() and not (run / "export_bad").exists()
    assert not (run / "slurm" / f"export-{ids['export']}.out").exists()  # it never ran


def test_tournament_candidates_run_as_jobs_of_their_own(slurm, chain):
    """cluster.tournament_jobs: prune_prepare (search, candidates, teacher cache), then each
    candidate's tournament in a job of its own after it, then prune (the winner, published)
    after all of them; the result is the one-process tournament's."""
    run = chain["run"]
    search = ["prune.hidden_size=null", "prune.ffn_hidden_size=null",
              "prune.num_attention_heads=null", "prune.target_params=0.85",
              "prune.search.top_k=2", "prune.search.hidden_size_divisor=16",
              "prune.search.ffn_hidden_size_divisor=16", "prune.search.num_layers_divisor=1",
              "prune.search.max_depth_pruning=0.5", "prune.search.tournament_steps=3"]
    ids = submit(slurm, run, chain["hf"], "cluster.stages=[prune]",
                 "cluster.tournament_jobs=true", f"prune.output={run}/prune_jobs", *search)
    assert list(ids) == ["prune_prepare", "prune_c1", "prune_c2", "prune"]
    states = wait(slurm, list(ids.values()), 600)
    infos = {j: job(slurm, i) for j, i in ids.items()}
    assert all(i["JobState"] == "COMPLETED" for i in infos.values()), states
    for c in ("prune_c1", "prune_c2"):
        assert infos[c]["StartTime"] >= infos["prune_prepare"]["EndTime"]
        assert infos["prune"]["StartTime"] >= infos[c]["EndTime"]
        text = log(run, c, ids[c])
        assert f"tournament {c[-2:]} " in text and "held-out KD loss" in text  # trained here
    assert "prepared 2 tournament candidates" in log(run, "prune_prepare", ids["prune_prepare"])
    assert "held-out KD loss" not in log(run, "prune", ids["prune"])  # reused, not retrained
    res = json.loads((run / "prune_jobs" / "search.json").read_text())
    # the same tournament in one process
    from recipes import prune

    assert prune.main(["--config", TINY, f"run.dir={run}", f"prune.output={run}/prune_one",
                       *search]) == 0
    one = json.loads((run / "prune_one" / "search.json").read_text())
    assert res["winner"] == one["winner"]
    for a, b in zip(res["candidates"], one["candidates"]):
        assert a["ss_config"] == b["ss_config"]
        assert a["tournament_kd_loss"] == pytest.approx(b["tournament_kd_loss"], abs=1e-6)
