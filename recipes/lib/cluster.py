"""The `cluster` section: where and how `make all` / recipes/launch.py run a recipe's chain of
stages (Slurm account, partition, container, nodes, layouts, time limits). A section of its
own, read by launch and by plan (which prices the cluster's GPUs)."""
from __future__ import annotations

import dataclasses
from recipes.lib.errors import Refusal

STAGES = ["data", "convert", "prune", "distill", "export", "evaluate", "report"]
WORKDIR = "/workspace/minitron-recipes"


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
    workdir: str = WORKDIR
    """This repository inside the container."""
    mount_repo: bool = True
    """Mount this checkout at `workdir`: the code and conf/ that rendered the scripts run, and a
    relative run.dir lands on the shared filesystem, not in the container."""
    gpus_per_node: int = 8
    """GPUs (= tasks) per node."""
    stages: list = dataclasses.field(default_factory=lambda: list(STAGES))
    """Stages to chain, in order, under every launcher (make all STAGES="..." sets it)."""
    nodes: dict = dataclasses.field(default_factory=dict)
    """Nodes per stage on Slurm (default 1): nodes.distill x gpus_per_node are the GPUs plan
    prices and lays distillation out for."""
    layout: dict = dataclasses.field(default_factory=dict)
    """TP/PP per stage set by hand, e.g. {distill: {tp: 2, pp: 1}} (prune must be TP=1);
    prune, distill and teacher_correction left out get plan's choice, other stages TP=PP=1."""
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
        self.layout = {k: {"tp": 1, "pp": 1, **(v or {})} for k, v in self.layout.items()}
        if self.signal_grace_s < 60:
            raise Refusal(f"cluster.signal_grace_s={self.signal_grace_s}: leave at least 60 s "
                          "(one training step plus one checkpoint save) before the time limit")
        if self.gpus_per_node < 1:
            raise Refusal("cluster.gpus_per_node must be >= 1")
        for job, t in self.time.items():
            if not isinstance(t, str):  # YAML 1.1 reads 12:00:00 as 43200 (base 60)
                raise Refusal(
                    f"cluster.time.{job}={t!r} is a number, not a Slurm time (YAML reads "
                    "12:00:00 as 43200, base 60, and Slurm would take it as minutes): quote it, "
                    f"cluster.time.{job}=\"'12:00:00'\" on the command line or '12:00:00' in "
                    "the YAML, or write 0-12:00:00")
        if self.layout.get("prune", {}).get("tp", 1) != 1:
            raise Refusal("cluster.layout.prune.tp must be 1 (ModelOpt Minitron pruning)")
        for key, value in (("account", self.account), ("partition", self.partition),
                           *(("extra_sbatch", x) for x in self.extra_sbatch)):
            if any(ch.isspace() for ch in str(value)):
                raise Refusal(f"cluster.{key}={value!r} contains whitespace: a #SBATCH line "
                              "cannot carry it")
