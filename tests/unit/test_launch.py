"""The Slurm chain for the paper's recipes, rendered in dry-run mode (no Slurm here)."""
import json
import re
from pathlib import Path

import pytest

from recipes import launch
from recipes.lib.cluster import ClusterConfig

CONF = Path(__file__).resolve().parents[2] / "conf"


def dry_run(recipe, *extra, capsys, argv=None):
    assert launch.main(["--config", str(CONF / recipe), "--dry-run", *extra]) == 0
    out = capsys.readouterr().out
    scripts = dict(re.findall(r"### (\w+)\.sbatch\n(.*?)\n### \w+\.args\.json", out, re.S))
    if argv is not None:
        argv.update({k: json.loads(v) for k, v in
                     re.findall(r"### (\w+)\.args\.json\n(.*?)\n\$ sbatch", out, re.S)})
    submits = re.findall(r"^\$ sbatch --parsable (.*)$", out, re.M)
    return scripts, submits


@pytest.mark.parametrize("recipe", ["llama31_8b_to_4b_width.yaml",
                                    "llama31_8b_to_4b_depth.yaml"])
def test_chain_resources_container_and_requeue(recipe, capsys):
    plan_choice = {"llama31_8b_to_4b_width.yaml": ["parallel.tp=1", "parallel.pp=2"],
                   "llama31_8b_to_4b_depth.yaml": ["parallel.tp=1", "parallel.pp=1"]}[recipe]
    argv = {}
    scripts, submits = dry_run(recipe, "cluster.account=proj", "cluster.partition=batch",
                               "cluster.container_mounts=/lustre:/lustre", capsys=capsys,
                               argv=argv)
    assert list(scripts) == ["data", "convert", "prune", "distill", "export", "evaluate",
                             "report"]
    # afterok chain, each job on the previous one
    assert "--dependency" not in submits[0]
    for prev, cur in zip(scripts, submits[1:]):
        assert f"--dependency=afterok:${{JOB_{prev.upper()}}}" in cur
    d = scripts["distill"]
    assert "#SBATCH --nodes=1" in d and "#SBATCH --gpus-per-node=8" in d
    assert "#SBATCH --ntasks-per-node=8" in d and "#SBATCH --account=proj" in d
    assert "#SBATCH --requeue" in d and "#SBATCH --open-mode=append" in d
    assert "#SBATCH --signal=USR1@300" in d  # to the tasks: training saves, exits 75
    assert "scontrol requeue" in d and 'if true && [ "$rc" -eq 75 ]; then' in d
    assert "--container-image=./minitron-recipes+latest.sqsh" in d  # our build, not bare NeMo
    # this checkout at the workdir (code, conf/, relative run dirs), then the user's mounts
    assert f"--container-mounts={launch.ROOT}:/workspace/minitron-recipes,/lustre:/lustre" in d
    assert argv["distill"][-2:] == plan_choice  # plan's, for one node of 80 GB GPUs
    assert '"$MINITRON_PYTHON" -m recipes.distill --args-file' in d
    assert "MINITRON_PYTHON=python" in d  # the container's python
    assert submits[3].startswith("--job-name=minitron-") and "--output=" in submits[3]
    p = scripts["prune"]
    assert argv["prune"][-2:] == ["parallel.tp=1", "parallel.pp=1"]  # the fewest that fit
    assert "#SBATCH --ntasks-per-node=1" in p
    assert "--requeue" not in p and "--signal" not in p and "if false && " in p
    assert "#SBATCH --ntasks-per-node=1" in scripts["data"]
    assert "--gpus-per-node" not in scripts["data"] and "--gpus-per-node" not in scripts["report"]
    e = scripts["evaluate"]  # one process on one GPU, the node shared
    assert "#SBATCH --gpus-per-node=1" in e and "--exclusive" not in e
    assert "#SBATCH --ntasks-per-node=1" in e and "parallel.tp" not in " ".join(argv["evaluate"])
    for s in scripts.values():
        assert "RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID" in s
        assert "MASTER_ADDR=$(scontrol show hostnames" in s


def test_layout_errors(capsys):
    with pytest.raises(ValueError, match="cluster.layout.prune.tp must be 1"):
        dry_run("llama31_8b_to_4b_width.yaml", "cluster.layout.prune.tp=2", capsys=capsys)
    with pytest.raises(ValueError, match="signal_grace_s=30: leave at least 60 s"):
        dry_run("llama31_8b_to_4b_width.yaml", "cluster.signal_grace_s=30", capsys=capsys)
    with pytest.raises(ValueError, match=r"cluster.layout.distill=\{'tp': 8, 'pp': 2\} does not "
                       "divide the models, the 4 GPUs"):
        dry_run("llama31_8b_to_4b_width.yaml", "cluster.layout.distill.pp=2",
                "cluster.layout.distill.tp=8", "cluster.gpus_per_node=4", capsys=capsys)


def test_missing_image_is_refused_before_anything_is_submitted(tmp_path):
    with pytest.raises(ValueError, match="container_image=./nope.sqsh does not exist: build it"):
        launch.main(["--config", str(CONF / "llama31_8b_to_4b_width.yaml"),
                     "cluster.container_image=./nope.sqsh", f"run.dir={tmp_path}"])
    assert not (tmp_path / "slurm").exists()


HOSTILE = ["run.dir=/x/my runs", "distill.output=${run.dir}/out; touch /tmp/pwned",
           "report.title=it's \"quoted\" $HOME `id` $(id)", "evaluate.prompts=[a\nb]",
           "data.input=/d/{x}/%j"]


def test_overrides_reach_the_stage_byte_for_byte(tmp_path):
    """The rendered script, run by bash with stand-ins for srun and scontrol and a `python`
    that records the argument vector the stage's own parser reads (--args-file): every value,
    spaces, quotes, ;, $, ${...}, backticks and newlines included, arrives unchanged and
    nothing in it runs."""
    import os
    import subprocess
    import sys

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n'
                               'while [[ $1 == --* ]]; do shift; done\n'
                               'export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0\nexec "$@"\n')
    (bin_ / "scontrol").write_text('#!/bin/bash\n[ "$1" = show ] && echo 127.0.0.1\nexit 0\n')
    (bin_ / "python").write_text(
        f"#!{sys.executable}\nimport json, os, sys\nsys.path.insert(0, {str(launch.ROOT)!r})\n"
        "from recipes.lib.config import read_args_file\n"
        "assert sys.argv[1:4] == ['-m', 'recipes.distill', '--args-file'], sys.argv\n"
        "json.dump(read_args_file(sys.argv[4]), open(os.environ['ARGV_OUT'], 'w'))\n")
    for f in ("srun", "scontrol", "python"):
        (bin_ / f).chmod(0o755)
    run_dir = tmp_path / "my runs; $(id)"
    c = ClusterConfig(gpus_per_node=1, nodes={"distill": 1}, layout={"distill": {"tp": 1}},
                             container_image="./my image.sqsh")
    script = launch.write_job("distill", c, "conf/tiny.yaml", str(run_dir), HOSTILE)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "ARGV_OUT": str(tmp_path / "a"),
           "SRUN_ARGS": str(tmp_path / "srun"), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node1"}
    p = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads((tmp_path / "a").read_text())
    assert got == ["--config", "conf/tiny.yaml", *HOSTILE, "parallel.tp=1", "parallel.pp=1"]
    assert "--container-image=./my image.sqsh" in (tmp_path / "srun").read_text().splitlines()
    assert not Path("/tmp/pwned").exists()


def test_whitespace_in_sbatch_lines_is_refused():
    with pytest.raises(ValueError, match="cluster.account='my proj' contains whitespace"):
        ClusterConfig(account="my proj")


def test_a_finished_stage_process_ignores_late_preemption_signals(monkeypatch):
    """A stage run as its own process (argv from the command line) that has committed its
    output ignores a late SIGUSR1/SIGTERM while it winds down (Slurm's time-limit signal racing
    the end of a resumed run failed the job); called in-process, it leaves handlers alone."""
    import os
    import signal
    import types

    from recipes.lib import config, runtime, stage

    cfg = types.SimpleNamespace(run=types.SimpleNamespace(log_level="WARNING"))
    monkeypatch.setattr(config, "parse_args", lambda *a: cfg)
    monkeypatch.setattr(runtime, "setup_logging", lambda level: None)
    sigs = (signal.SIGUSR1, signal.SIGTERM)
    old = {s: signal.getsignal(s) for s in sigs}
    try:
        assert stage.main(lambda c: None, "data", "", ["--config", "x.yaml"]) == 0
        assert {s: signal.getsignal(s) for s in sigs} == old
        assert stage.main(lambda c: None, "data", "") == 0
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in sigs)
        os.kill(os.getpid(), signal.SIGUSR1)  # default action would end this process
    finally:
        for s, h in old.items():
            signal.signal(s, h)


SEARCH_8B = ["prune.hidden_size=null", "prune.ffn_hidden_size=null", "prune.num_layers=null",
             "prune.num_attention_heads=null", "prune.target_params=4.5e9",
             "prune.search={top_k: 3, tournament_tokens: 2e8}"]


def test_tournament_candidates_as_jobs_of_their_own(capsys):
    """cluster.tournament_jobs: prune becomes prune_prepare, then one job per candidate side by
    side (requeued like training), then prune, on which distill waits."""
    argv = {}
    scripts, submits = dry_run("llama31_8b_to_4b_width.yaml", *SEARCH_8B,
                               "cluster.tournament_jobs=true", "cluster.time.prune_c2='12:00:00'",
                               capsys=capsys, argv=argv)
    assert list(scripts) == ["data", "convert", "prune_prepare", "prune_c1", "prune_c2",
                             "prune_c3", "prune", "distill", "export", "evaluate", "report"]
    deps = {j: re.search(r"--dependency=afterok:([^' ]+)", s) for j, s in zip(scripts, submits)}
    assert deps["prune_prepare"].group(1) == "${JOB_CONVERT}"
    for i in (1, 2, 3):
        assert deps[f"prune_c{i}"].group(1) == "${JOB_PRUNE_PREPARE}"
        c = scripts[f"prune_c{i}"]
        assert argv[f"prune_c{i}"][-3:] == [f"prune.tournament_job=c{i}", "parallel.tp=1",
                                            "parallel.pp=1"]
        assert "#SBATCH --requeue" in c and 'if true && [ "$rc" -eq 75 ]' in c
        assert f"slurm/prune_c{i}.args.json" in c and "-m recipes.prune" in c
    assert "#SBATCH --time=12:00:00" in scripts["prune_c2"]
    assert deps["prune"].group(1) == "${JOB_PRUNE_C1}:${JOB_PRUNE_C2}:${JOB_PRUNE_C3}"
    assert deps["distill"].group(1) == "${JOB_PRUNE}"
    assert "prune.tournament_job=prepare" in argv["prune_prepare"]
    assert not any(a.startswith("prune.tournament_job") for a in argv["prune"])
    assert "--requeue" not in scripts["prune_prepare"] and "--requeue" not in scripts["prune"]


def test_tournament_jobs_need_a_tournament():
    with pytest.raises(ValueError, match="prune runs no tournament"):
        launch.main(["--config", str(CONF / "llama31_8b_to_4b_width.yaml"), "--dry-run",
                     "cluster.tournament_jobs=true"])


def test_a_time_yaml_reads_as_a_number_is_refused():
    """YAML 1.1 reads 12:00:00 as 43200 (base 60); Slurm would read --time=43200 as 30 days."""
    with pytest.raises(ValueError, match="cluster.time.distill=43200 is a number.*quote it, "
                       "cluster.time.distill="):
        launch.main(["--config", str(CONF / "llama31_8b_to_4b_width.yaml"), "--dry-run",
                     "cluster.time.distill=12:00:00"])


TINY = str(CONF / "tiny.yaml")


def here(*extra, capsys):
    assert launch.main(["--config", TINY, "--dry-run", "run.dir=runs/t", "convert.hf_path=/m",
                        "data.input=/d", *extra]) == 0
    return [(m[0], m[1].split()) for m in
            re.findall(r"^### (\w+)\n\$ (.*)$", capsys.readouterr().out, re.M)]


def test_make_all_here_runs_each_stage_at_its_own_layout(capsys):
    """make all NPROC=2: data, evaluate and report as one process; convert, prune and export at
    their TP x PP; training over all NPROC; STAGES (cluster.stages) picks the chain; under
    LAUNCH=docker every stage runs in the image, the GPU stages with the GPUs."""
    got = dict(here("--local", "2", "cluster.layout.export.tp=2", capsys=capsys))
    assert list(got) == launch.STAGES
    for stage in ("data", "convert", "prune", "evaluate", "report"):
        assert got[stage][1:3] == ["-m", f"recipes.{stage}"], got[stage]
    assert got["distill"][1:4] == ["--nproc-per-node", "2", "-m"]
    assert got["export"][1:3] == ["--nproc-per-node", "2"]
    assert got["export"][-2:] == ["parallel.tp=2", "parallel.pp=1"]
    assert "parallel.tp=1" not in got["data"]
    docker = dict(here("--local", "2", "--image", "img:1", "--mount", "/lustre",
                       "cluster.stages=[data,distill,evaluate]", capsys=capsys))
    assert list(docker) == ["data", "distill", "evaluate"]
    assert "--gpus" not in docker["data"] and "--gpus" in docker["evaluate"]
    img = docker["distill"].index("img:1")
    assert docker["distill"][img + 1:img + 4] == ["torchrun", "--nproc-per-node", "2"]
    assert ["-v", "/lustre:/lustre"] == docker["distill"][
        docker["distill"].index("/lustre:/lustre") - 1:][:2]
    with pytest.raises(ValueError, match="prune at TP=1 PP=2 does not fit NPROC=1: set "
                       "cluster.layout.prune"):
        here("--local", "1", "cluster.layout.prune.pp=2", capsys=capsys)


def test_the_chain_takes_plans_layouts_unless_set_by_hand(capsys):
    """No layout in the recipe: plan's choice for the GPUs there are (recompute passed on when
    only it fits); one by hand wins; an impossible one is refused before anything runs."""
    argv = {}
    dry_run("llama31_8b_to_4b_width.yaml", "plan.gpu_memory_gb=64", "cluster.gpus_per_node=2",
            capsys=capsys, argv=argv)
    assert argv["distill"][-3:] == ["parallel.tp=1", "parallel.pp=2", "distill.recompute_layers=16"]
    dry_run("llama31_8b_to_4b_width.yaml", "cluster.layout.distill.tp=4", capsys=capsys,
            argv=argv)
    assert argv["distill"][-2:] == ["parallel.tp=4", "parallel.pp=1"]
    with pytest.raises(ValueError, match="no layout fits 90% of 8 GB per GPU"):
        dry_run("llama31_8b_to_4b_width.yaml", "plan.gpu_memory_gb=8", capsys=capsys)


def test_a_mixture_of_experts_trains_with_its_experts_shared_out(capsys):
    """Qwen3-30B-A3B on 8 GPUs: plan's distill layout shares the experts over EP ranks and the
    chain passes parallel.ep on; prune stays at EP=1 (ModelOpt); one set by hand wins."""
    argv = {}
    dry_run("qwen3_30b_a3b_to_a2b.yaml", capsys=capsys, argv=argv)
    assert any(a.startswith("parallel.ep=") and a != "parallel.ep=1" for a in argv["distill"])
    assert not any(a.startswith("parallel.ep=") for a in argv["prune"])
    dry_run("qwen3_30b_a3b_to_a2b.yaml", "cluster.layout.distill={tp: 1, pp: 2, ep: 4}",
            capsys=capsys, argv=argv)
    assert argv["distill"][-3:] == ["parallel.tp=1", "parallel.pp=2", "parallel.ep=4"]


def test_data_evaluate_and_report_refuse_several_ranks(monkeypatch, tmp_path):
    """Under torchrun every rank would write the same folder: refused before any folder."""
    from recipes import data, evaluate, report
    monkeypatch.setenv("WORLD_SIZE", "2")
    for stage in (data, evaluate, report):
        name = stage.__name__.split(".")[-1]
        with pytest.raises(ValueError, match=f"{name} runs as one process, not 2 \\(torchrun, "
                           "NPROC\\): each would write the same folder"):
            stage.main(["--config", TINY, f"run.dir={tmp_path}", "convert.hf_path=/m",
                        "data.input=/d"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_make_all_with_two_processes_writes_the_data_once(hf_models, tmp_path):
    """`make all NPROC=2 STAGES=data` on the tiny recipe, as typed: one process writes the data
    folder once (its manifest and one log), nothing is left half-written."""
    import subprocess
    import sys

    from tests.corpus import write_corpus

    corpus = write_corpus(tmp_path / "corpus", n_docs=30)
    run = tmp_path / "run"
    p = subprocess.run(["make", "--no-print-directory", "all", "NPROC=2", "STAGES=data",
                        f"PY={sys.executable}",
                        f"ARGS=run.dir={run} convert.hf_path={hf_models['gqa']} "
                        f"data.input={corpus}"], cwd=launch.ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stdout.count("### ") == 1 and "-m recipes.data" in p.stdout
    assert "torchrun" not in p.stdout
    assert sorted(x.name for x in run.iterdir() if x.name != ".data.lock") == ["data"]
    assert (run / "data" / "manifest.json").is_file()
    assert {x.name for x in (run / "data").iterdir()} >= {"train.bin", "valid.bin", "test.bin"}
