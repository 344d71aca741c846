"""Submit a recipe's stages to Slurm as a chain of jobs, in the project's container (pyxis) or
bare-metal, and report on a submitted chain.

    python -m recipes.launch --config conf/llama31_8b_to_4b_width.yaml [--dry-run] [overrides]
    python -m recipes.launch --config ... --status [overrides]      # or make status LAUNCH=slurm
    make all LAUNCH=slurm RECIPE=conf/llama31_8b_to_4b_width.yaml [DRY_RUN=1]

Bare-metal (`cluster.container_image=null`, for clusters without pyxis): the jobs run
`cluster.python` (default: the interpreter that submits, e.g. this checkout's .venv) in the
directory sbatch was called from, with the same signals, requeue and logs.

Everything cluster-specific comes from the recipe's `cluster` section (or the environment through
OmegaConf's ${oc.env:VAR,default}): account, partition, container image and mounts, nodes and the
TP/PP layout per stage. Each stage becomes one batch script (scripts/slurm/stage.sbatch.in)
running one task per GPU with `srun` + pyxis/enroot (`--container-image`); ranks rendezvous
through MASTER_ADDR/MASTER_PORT from the job's first node, as torchrun would. Jobs chain with
`--dependency=afterok` and `--kill-on-invalid-dep=yes`: when a stage fails, the jobs after it
are cancelled (Reason=DependencyNeverSatisfied) instead of pending forever, and nothing after
it is published. The job ids go to <run.dir>/slurm/jobs.json for `--status`. Training stages are `--requeue`d and their tasks get SIGUSR1
`signal_grace_s` before the time limit: training saves a checkpoint at the end of the current step
and exits 75, on which the batch script requeues the job; the rerun resumes from that checkpoint
(a preempting SIGTERM does the same). `--dry-run` prints the scripts and sbatch lines and submits
nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

from recipes.lib import config
from recipes.lib.stage import cli

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "scripts" / "slurm" / "stage.sbatch.in"
GPU_STAGES = ("convert", "teacher_correction", "prune", "distill", "export")
RESUMABLE = ("teacher_correction", "distill")
DEFAULT_LAYOUT = {"prune": {"tp": 1, "pp": 8}, "distill": {"tp": 8, "pp": 1},
                  "teacher_correction": {"tp": 8, "pp": 1}}


@dataclasses.dataclass(kw_only=True)
class ClusterConfig:
    account: str = ""
    """Slurm account (--account); empty: the user's default."""
    partition: str = ""
    """Slurm partition (--partition); empty: the default."""
    container_image: str | None = "./minitron-recipes+latest.sqsh"
    """Image for pyxis: docker/Dockerfile's build (`make docker-build`, then `enroot import
    dockerd://minitron-recipes:latest` in this directory), or a registry tag of it. Not the bare
    NeMo image: it lacks this project's pinned megatron-core / ModelOpt. null: bare-metal."""
    python: str | None = None
    """Bare-metal only: the Python that runs the stages (default: the one running the
    launcher, e.g. this checkout's .venv/bin/python)."""
    gpus: bool = True
    """Request GPUs (--gpus-per-node, --exclusive); false on CPU-only clusters (tests,
    scripts/slurm/local_cluster.sh). Tasks per node stay gpus_per_node."""
    container_mounts: str = ""
    """Comma-separated src:dst mounts (data, models, absolute run directories)."""
    workdir: str = "/workspace/minitron-recipes"
    """This repository inside the container."""
    mount_repo: bool = True
    """Mount this checkout at `workdir`: the code and conf/ that rendered the scripts run, and a
    relative run.dir lands on the shared filesystem, not in the container."""
    gpus_per_node: int = 8
    """GPUs (= tasks) per node."""
    stages: list = dataclasses.field(
        default_factory=lambda: ["data", "convert", "prune", "distill", "export"])
    """Stages to chain, in order."""
    nodes: dict = dataclasses.field(default_factory=lambda: {"distill": 32})
    """Nodes per stage (default 1)."""
    layout: dict = dataclasses.field(default_factory=dict)
    """TP/PP per stage, merged over DEFAULT_LAYOUT (prune must be TP=1)."""
    time: dict = dataclasses.field(default_factory=lambda: {"distill": "04:00:00"})
    """Time limit per stage (default 04:00:00)."""
    signal_grace_s: int = 300
    """Seconds before the time limit at which training saves and requeues; must exceed one step
    plus one checkpoint save."""
    extra_sbatch: list = dataclasses.field(default_factory=list)
    """Further #SBATCH lines, e.g. ["--qos=high"]."""
    tournament_jobs: bool = False
    """prune with a tournament (prune.target_* + prune.search.tournament_steps/tokens): run
    each candidate's distillation as a job of its own (prune_c1..prune_c<top_k>, side by side
    after prune_prepare, each with prune's layout and requeued like training), then `prune`
    picks the winner. Off: one prune job trains the candidates one after another."""

    def __post_init__(self):
        self.layout = {k: {"tp": 1, "pp": 1, **DEFAULT_LAYOUT.get(k, {}), **self.layout.get(k, {})}
                       for k in {*DEFAULT_LAYOUT, *self.layout}}
        if self.signal_grace_s < 60:
            raise ValueError(f"cluster.signal_grace_s={self.signal_grace_s}: leave at least 60 s "
                             "(one training step plus one checkpoint save) before the time limit")
        if self.gpus_per_node < 1:
            raise ValueError("cluster.gpus_per_node must be >= 1")
        for job, t in self.time.items():
            if not isinstance(t, str):  # YAML 1.1 reads 12:00:00 as 43200 (base 60)
                raise ValueError(
                    f"cluster.time.{job}={t!r} is a number, not a Slurm time (YAML reads "
                    "12:00:00 as 43200, base 60, and Slurm would take it as minutes): quote it, "
                    f"cluster.time.{job}=\"'12:00:00'\" on the command line or '12:00:00' in "
                    "the YAML, or write 0-12:00:00")
        if self.layout.get("prune", {}).get("tp", 1) != 1:
            raise ValueError("cluster.layout.prune.tp must be 1 (ModelOpt Minitron pruning)")
        for key, value in (("account", self.account), ("partition", self.partition),
                           *(("extra_sbatch", x) for x in self.extra_sbatch)):
            if any(ch.isspace() for ch in str(value)):
                raise ValueError(f"cluster.{key}={value!r} contains whitespace: a #SBATCH line "
                                 "cannot carry it")


def resources(stage: str, c: ClusterConfig) -> tuple[int, int, dict]:
    """(nodes, tasks per node, TP/PP layout) of a stage's job."""
    lay = c.layout.get(stage, {"tp": 1, "pp": 1})  # complete after __post_init__
    mp = lay["tp"] * lay["pp"]
    if stage in RESUMABLE:  # training: every GPU of every node, data parallel over TP*PP groups
        nodes, tasks = int(c.nodes.get(stage, 1)), c.gpus_per_node
        if (nodes * tasks) % mp:
            raise ValueError(f"{stage}: {nodes} node(s) x {tasks} GPUs is not a multiple of "
                             f"TP*PP={lay['tp']}*{lay['pp']}")
    elif stage in GPU_STAGES:  # one model replica: TP*PP ranks
        nodes, tasks = -(-mp // c.gpus_per_node), min(mp, c.gpus_per_node)
    else:
        nodes, tasks = 1, 1
    return nodes, tasks, lay


def stage_argv(stage: str, c: ClusterConfig, recipe: str, overrides: list[str]) -> list[str]:
    """The stage's command-line arguments, exactly as given (written to <stage>.args.json)."""
    args = ["--config", recipe, *overrides]
    if stage in GPU_STAGES:
        lay = resources(stage, c)[2]
        args += [f"parallel.tp={lay['tp']}", f"parallel.pp={lay['pp']}"]
    return args


def job_groups(stage: str, c: ClusterConfig,
               cfg: config.Config) -> list[list[tuple[str, list[str]]]]:
    """The jobs a stage becomes, in groups that run one after another (the jobs of a group side
    by side): [[(job name, extra overrides)]]. One job, except prune's tournament with
    cluster.tournament_jobs: prune_prepare, then prune_c1..prune_c<top_k>, then prune."""
    if stage != "prune" or not c.tournament_jobs:
        return [[(stage, [])]]
    p = cfg.typed("prune")  # its values checked now, before anything is submitted
    if not p.tournament:
        raise ValueError("cluster.tournament_jobs=true but prune runs no tournament: set "
                         "prune.target_params (or target_memory_mb) and "
                         "prune.search.tournament_steps (or tournament_tokens)")
    job = "prune.tournament_job="
    return [[("prune_prepare", [job + "prepare"])],
            [(f"prune_c{i}", [f"{job}c{i}"]) for i in range(1, p.search.top_k + 1)],
            [("prune", [])]]


def is_candidate(job: str) -> bool:
    return job.startswith("prune_c")


def sbatch_options(job: str, c: ClusterConfig, recipe: str, run_dir: str) -> list[str]:
    """Options that carry user strings (names, paths): given on sbatch's command line as list
    items, never parsed by a shell or by sbatch's #SBATCH reader."""
    return [f"--job-name=minitron-{Path(recipe).stem}-{job}",
            f"--output={run_dir}/slurm/{job}-%j.out", "--kill-on-invalid-dep=yes"]


def render(stage: str, c: ClusterConfig, recipe: str, run_dir: str, job: str | None = None) -> str:
    """The batch script of `job` (default: the stage's one job). Its stage arguments are read
    from `<run_dir>/slurm/<job>.args.json` (`write_job`), so no override value is ever parsed
    by a shell."""
    job = job or stage
    nodes, tasks, _ = resources(stage, c)
    gpu = stage in GPU_STAGES
    requeue = stage in RESUMABLE or is_candidate(job)  # training: saves on a signal, resumes
    sbatch = [f"--nodes={nodes}", f"--ntasks-per-node={tasks}",
              f"--time={c.time.get(job, c.time.get(stage, '04:00:00'))}"]
    if gpu and c.gpus:
        sbatch += [f"--gpus-per-node={c.gpus_per_node}", "--exclusive"]
    if c.account:
        sbatch.append(f"--account={c.account}")
    if c.partition:
        sbatch.append(f"--partition={c.partition}")
    if requeue:
        # the signal goes to the tasks (not B: the batch shell); append across requeues
        sbatch += ["--requeue", f"--signal=USR1@{c.signal_grace_s}", "--open-mode=append"]
    sbatch += list(c.extra_sbatch)
    if c.container_image is None:  # bare-metal: the submitting checkout and interpreter
        srun, python = ["--kill-on-bad-exit=1"], c.python or sys.executable
    else:
        mounts = ",".join(([f"{ROOT}:{c.workdir}"] if c.mount_repo else [])
                          + [m for m in c.container_mounts.split(",") if m])
        srun = [f"--container-image={c.container_image}"]
        srun += [f"--container-mounts={mounts}"] if mounts else []
        srun += [f"--container-workdir={c.workdir}", "--no-container-mount-home",
                 "--kill-on-bad-exit=1"]
        python = "python"
    return TEMPLATE.read_text().format(
        sbatch="\n".join(f"#SBATCH {x}" for x in sbatch), stage=stage,
        requeue="true" if requeue else "false", srun=shlex.join(srun),
        python=shlex.quote(python), args_file=shlex.quote(f"{run_dir}/slurm/{job}.args.json"))


def write_job(stage: str, c: ClusterConfig, recipe: str, run_dir: str,
              overrides: list[str], job: str | None = None) -> Path:
    """<run_dir>/slurm/<job>.sbatch and its <job>.args.json; returns the script's path."""
    job = job or stage
    folder = Path(run_dir) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{job}.args.json").write_text(
        json.dumps(stage_argv(stage, c, recipe, overrides), indent=1) + "\n")
    script = folder / f"{job}.sbatch"
    script.write_text(render(stage, c, recipe, run_dir, job))
    return script


def submit(c: ClusterConfig, recipe: str, run_dir: str, overrides: list[str],
           dry_run: bool, cfg: config.Config) -> dict:
    """Submit (or print) the chain; returns {job: job id} (also in <run_dir>/slurm/jobs.json).
    `cfg`: the whole recipe (its prune section decides prune's tournament jobs)."""
    image = c.container_image
    if not dry_run and image and image.startswith(("/", "./")) and not Path(image).is_file():
        raise ValueError(f"cluster.container_image={image} does not exist: build it with `make "
                         "docker-build && enroot import dockerd://minitron-recipes:latest`, set "
                         "cluster.container_image (MINITRON_IMAGE) to your image, or run "
                         "bare-metal with cluster.container_image=null")
    unknown = [s for s in c.stages if s not in config.SECTIONS or s in ("cluster", "plan")]
    if unknown:
        raise ValueError(f"cluster.stages has unknown stage(s) {unknown}")
    groups = [(stage, g) for stage in c.stages for g in job_groups(stage, c, cfg)]
    jobs, prev = {}, []
    for stage, group in groups:
        dep = [f"--dependency=afterok:{':'.join(prev)}"] if prev else []
        prev = []
        for job, extra in group:
            opts = sbatch_options(job, c, recipe, run_dir)
            if dry_run:
                print(f"### {job}.sbatch\n{render(stage, c, recipe, run_dir, job)}")
                print(f"### {job}.args.json\n" + json.dumps(stage_argv(
                    stage, c, recipe, [*overrides, *extra])))
                print("$ sbatch --parsable " + shlex.join(
                    [*opts, *dep, f"{run_dir}/slurm/{job}.sbatch"]))
                prev.append(f"${{JOB_{job.upper()}}}")
                continue
            path = write_job(stage, c, recipe, run_dir, [*overrides, *extra], job)
            prev.append(subprocess.run(
                ["sbatch", "--parsable", *opts, *dep, str(path)], check=True,
                capture_output=True, text=True).stdout.strip().split(";")[0])
            jobs[job] = prev[-1]
            print(f"{job}: job {prev[-1]}")
            (Path(run_dir) / "slurm" / "jobs.json").write_text(json.dumps(jobs, indent=1) + "\n")
    return jobs


def job_info(job: str) -> dict:
    """`scontrol show job` fields of a job slurmctld still knows (MinJobAge after it ended)."""
    p = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    if p.returncode:
        return {}
    return dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)


def status(c: ClusterConfig, run_dir: str) -> str:
    """The chain's jobs (state, reason, restarts, log) and the stage folders already committed:
    what a user checks in the morning."""
    f = Path(run_dir) / "slurm" / "jobs.json"
    jobs = json.loads(f.read_text()) if f.is_file() else {}
    lines = [f"run {run_dir}", "| stage | job | state | reason | restarts | exit | committed |",
             "|---|---|---|---|---|---|---|"]
    for stage in dict.fromkeys([*c.stages, *jobs]):
        job = jobs.get(stage, "-")
        info = job_info(job) if job != "-" else {}
        state = info.get("JobState", "not submitted" if job == "-" else
                         "unknown (no longer in slurmctld; see its log)")
        done = "-" if stage not in c.stages else \
            "yes" if (Path(run_dir) / stage / "manifest.json").is_file() else "no"
        lines.append(f"| {stage} | {job} | {state} | {info.get('Reason', '-')} | "
                     f"{info.get('Restarts', '-')} | {info.get('ExitCode', '-')} | {done} |")
    lines.append(f"logs: {run_dir}/slurm/<stage>-<job>.out")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--dry-run", action="store_true", help="print the scripts, submit nothing")
    ap.add_argument("--status", action="store_true", help="the submitted chain's state")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)

    def go() -> int:
        cfg = config.load(a.config, a.overrides, stage="cluster")
        if a.status:
            print(status(cfg.cluster, cfg.run.dir))
        else:
            submit(cfg.cluster, a.config, cfg.run.dir, a.overrides, a.dry_run, cfg)
        return 0

    return cli(go, "launch") if argv is None else go()


if __name__ == "__main__":
    sys.exit(main())
