"""Run a recipe's chain of stages (`cluster.stages`) here, in the project's container, or as a
chain of Slurm jobs (in the container through pyxis, or bare-metal), each stage at its own
layout; and report on a submitted chain.

    python -m recipes.launch --config conf/llama31_8b_to_4b_width.yaml [--dry-run] [overrides]
    python -m recipes.launch --config ... --local 8 [--image minitron-recipes:latest]
    python -m recipes.launch --config ... --status [overrides]      # or make status LAUNCH=slurm
    make all [LAUNCH=local|docker|slurm] [NPROC=8] RECIPE=... [STAGES="distill export"] [DRY_RUN=1]

Layouts: prune, distill and teacher_correction run at `cluster.layout.<stage>` where the recipe
sets one, else at plan's choice (recipes/lib/layout.py: the fastest that fits
plan.gpu_memory_gb) for the stage's GPUs: cluster.nodes.<stage> x cluster.gpus_per_node on
Slurm, NPROC here. A layout the models, the GPUs or the batch do not divide is refused before
anything runs. data and report run as one process; evaluate as one process on one GPU.

Here (`--local N`): the stages one after another, torchrun for a stage of more than one rank,
each in the container with `--image` (docker run, this checkout mounted at its workdir).

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
it is published. The job ids go to <run.dir>/slurm/jobs.json for `--status`. Training stages
are `--requeue`d and their tasks get SIGUSR1 `signal_grace_s` before the time limit: training
saves a checkpoint at the end of the current step and exits 75, on which the batch script
requeues the job; the rerun resumes from that checkpoint (a preempting SIGTERM does the same).
`--dry-run` prints the scripts and sbatch lines (or, with --local, the commands) and runs
nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from recipes.lib import config, layout
from recipes.lib.cluster import STAGES, WORKDIR, ClusterConfig
from recipes.lib.stage import cli
from recipes.lib.errors import Refusal

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "scripts" / "slurm" / "stage.sbatch.in"
GPU_STAGES = ("convert", "teacher_correction", "prune", "distill", "export", "evaluate")
RESUMABLE = ("teacher_correction", "distill")
PLANNED = ("prune", "distill", "teacher_correction")  # plan chooses these layouts
ONE_RANK = ("data", "evaluate", "report")
# torchrun forwards SIGUSR1 too and waits up to 10 min for the ranks to save and stop (exit 75)
TORCHRUN_ENV = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"}


def resources(stage: str, c: ClusterConfig) -> tuple[int, int, dict]:
    """(nodes, tasks per node, TP/PP layout) of a stage's job."""
    lay = c.layout.get(stage, {"tp": 1, "pp": 1})  # complete after __post_init__ / laid_out
    mp = lay["tp"] * lay["pp"]
    if stage in RESUMABLE:  # training: every GPU of every node, data parallel over TP*PP groups
        nodes, tasks = int(c.nodes.get(stage, 1)), c.gpus_per_node
        if (nodes * tasks) % mp:
            raise Refusal(f"{stage}: {nodes} node(s) x {tasks} GPUs is not a multiple of "
                          f"TP*PP={lay['tp']}*{lay['pp']}")
    elif stage in GPU_STAGES and stage not in ONE_RANK:  # one model replica: TP*PP ranks
        nodes, tasks = -(-mp // c.gpus_per_node), min(mp, c.gpus_per_node)
    else:
        nodes, tasks = 1, 1
    return nodes, tasks, lay


def stage_argv(stage: str, c: ClusterConfig, recipe: str, overrides: list[str]) -> list[str]:
    """The stage's command-line arguments, exactly as given (written to <stage>.args.json)."""
    args = ["--config", recipe, *overrides]
    if stage in GPU_STAGES and stage not in ONE_RANK:
        lay = resources(stage, c)[2]
        args += [f"parallel.tp={lay['tp']}", f"parallel.pp={lay['pp']}"]
        if lay.get("ep", 1) > 1:  # a mixture of experts' experts over DP ranks
            args.append(f"parallel.ep={lay['ep']}")
        if lay.get("recompute_layers"):  # plan's choice: nothing fits without it
            args.append(f"{stage}.recompute_layers={lay['recompute_layers']}")
    return args


def laid_out(cfg: config.Config, c: ClusterConfig, gpus: dict) -> ClusterConfig:
    """`c` with a layout for each chained stage plan lays out (prune, distill,
    teacher_correction) that the recipe leaves to it: plan's choice for `gpus[stage]` GPUs.
    Layouts set by hand are checked against the models and the GPUs (refused where they do not
    divide them; a warning where plan's memory estimate exceeds the GPU's)."""
    todo = [s for s in PLANNED if s in c.stages]
    if not todo:
        return c
    try:
        arch = layout.models(cfg)
    except (ValueError, OSError) as e:  # no teacher config.json to read yet
        need = [s for s in todo if s not in c.layout]
        if need:
            raise Refusal(f"cluster.layout.{need[0]} is not set and plan cannot choose it: "
                          f"{e}") from None
        return c  # every layout by hand, the models unknown before convert: run as given
    chosen = {}
    for stage in todo:
        x = layout.stage_layout(cfg, stage, gpus[stage], arch)
        if stage == "prune":
            chosen[stage] = {"tp": 1, "pp": x}
            continue
        if stage in c.layout and not layout.fits(x.gb, cfg.section("plan").gpu_memory_gb):
            print(f"launch: warning: {stage} at cluster.layout.{stage} {x.describe()} exceeds "
                  f"plan.gpu_memory_gb={cfg.section('plan').gpu_memory_gb:g} by plan's estimate",
                  file=sys.stderr)
        chosen[stage] = {"tp": x.tp, "pp": x.pp, **({"ep": x.ep} if x.ep > 1 else {}), **(
            {"recompute_layers": x.recompute_layers} if x.recompute_layers
            and not layout.memory_settings(cfg, stage)["recompute_layers"] else {})}
    return dataclasses.replace(c, layout={**chosen, **c.layout})


def local_commands(c: ClusterConfig, recipe: str, overrides: list[str], nproc: int,
                   image: str | None = None, mounts: tuple = ()) -> list[tuple[str, list[str]]]:
    """[(stage, argv)] running the chain here on `nproc` GPUs (or CPU processes): torchrun for
    a stage of more than one rank, and everything inside `image` (docker run) when given."""
    out = []
    for stage in c.stages:
        lay = c.layout.get(stage, {"tp": 1, "pp": 1})
        n = 1 if stage in ONE_RANK or stage not in GPU_STAGES else \
            nproc if stage in RESUMABLE else lay["tp"] * lay["pp"]
        if n > nproc or nproc % (lay["tp"] * lay["pp"]):
            raise Refusal(f"{stage} at TP={lay['tp']} PP={lay['pp']} does not fit NPROC={nproc}"
                          f": set cluster.layout.{stage} to a TP x PP dividing {nproc}, or "
                          "raise NPROC")
        python = "python" if image else sys.executable
        run = [python, "-m"] if n == 1 else (
            ["torchrun" if image else str(Path(sys.executable).with_name("torchrun")),
             "--nproc-per-node", str(n), "-m"])
        argv = [*run, f"recipes.{stage}", *stage_argv(stage, c, recipe, overrides)]
        if image:
            argv = ["docker", "run", "--rm", "--ipc=host", "--ulimit", "memlock=-1",
                    *(["--gpus", "all"] if stage in GPU_STAGES else []),
                    "-v", f"{ROOT}:{WORKDIR}", *[a for m in mounts for a in ("-v", f"{m}:{m}")],
                    *[a for k, v in TORCHRUN_ENV.items() for a in ("-e", f"{k}={v}")],
                    "-w", WORKDIR, image, *argv]
        out.append((stage, argv))
    return out


def run_here(commands: list[tuple[str, list[str]]], dry_run: bool) -> None:
    for stage, argv in commands:
        print(f"### {stage}\n$ {shlex.join(argv)}", flush=True)
        if not dry_run:
            subprocess.run(argv, check=True, env={**os.environ, **TORCHRUN_ENV})


def job_groups(stage: str, c: ClusterConfig,
               cfg: config.Config) -> list[list[tuple[str, list[str]]]]:
    """The jobs a stage becomes, in groups that run one after another (the jobs of a group side
    by side): [[(job name, extra overrides)]]. One job, except prune's tournament with
    cluster.tournament_jobs: prune_prepare, then prune_c1..prune_c<top_k>, then prune."""
    if stage != "prune" or not c.tournament_jobs:
        return [[(stage, [])]]
    p = cfg.typed("prune")  # its values checked now, before anything is submitted
    if not p.tournament:
        raise Refusal("cluster.tournament_jobs=true but prune runs no tournament: set "
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
    if gpu and c.gpus:  # a one-rank GPU stage (evaluate) takes one GPU of a shared node
        sbatch += ["--gpus-per-node=1"] if stage in ONE_RANK else \
            [f"--gpus-per-node={c.gpus_per_node}", "--exclusive"]
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
        raise Refusal(f"cluster.container_image={image} does not exist: build it with `make "
                      "docker-build && enroot import dockerd://minitron-recipes:latest`, set "
                      "cluster.container_image (MINITRON_IMAGE) to your image, or run "
                      "bare-metal with cluster.container_image=null")
    unknown = [s for s in c.stages if s not in config.SECTIONS or s in ("cluster", "plan")]
    if unknown:
        raise Refusal(f"cluster.stages has unknown stage(s) {unknown}")
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
    ap.add_argument("--local", type=int, metavar="NPROC",
                    help="run the chain here on NPROC GPUs (or CPU processes) instead of Slurm")
    ap.add_argument("--image", help="with --local: run each stage in this container image")
    ap.add_argument("--mount", action="append", default=[],
                    help="with --image: a host folder mounted at the same path (repeatable)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args(argv)

    def go() -> int:
        cfg = config.load(a.config, a.overrides, stage="cluster", also=("plan",))
        c = cfg.cluster
        if a.status:
            print(status(c, cfg.run.dir))
        elif a.local is not None:
            if a.local < 1:
                raise Refusal(f"NPROC={a.local} must be >= 1")
            c = laid_out(cfg, c, dict.fromkeys(PLANNED, a.local))
            run_here(local_commands(c, a.config, a.overrides, a.local, a.image,
                                    tuple(a.mount)), a.dry_run)
        else:
            c = laid_out(cfg, c, {s: int(c.nodes.get(s, 1)) * c.gpus_per_node for s in PLANNED})
            submit(c, a.config, cfg.run.dir, a.overrides, a.dry_run, cfg)
        return 0

    return cli(go, "launch") if argv is None else go()


if __name__ == "__main__":
    sys.exit(main())
