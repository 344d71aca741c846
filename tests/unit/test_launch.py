"""The Slurm chain for the paper's recipes, rendered in dry-run mode (no Slurm here)."""
import re
from pathlib import Path

import pytest

from recipes import launch

CONF = Path(__file__).resolve().parents[2] / "conf"


def dry_run(recipe, *extra, capsys):
    assert launch.main(["--config", str(CONF / recipe), "--dry-run", *extra]) == 0
    out = capsys.readouterr().out
    scripts = dict(re.findall(r"### (\w+)\.sbatch\n(.*?)\n\$ sbatch", out, re.S))
    submits = re.findall(r"^\$ sbatch --parsable (.*)$", out, re.M)
    return scripts, submits


@pytest.mark.parametrize("recipe", ["llama31_8b_to_4b_width.yaml",
                                    "llama31_8b_to_4b_depth.yaml"])
def test_chain_resources_container_and_requeue(recipe, capsys):
    scripts, submits = dry_run(recipe, "cluster.account=proj", "cluster.partition=batch",
                               "cluster.container_mounts=/lustre:/lustre", capsys=capsys)
    assert list(scripts) == ["data", "convert", "prune", "distill", "export"]
    # afterok chain, each job on the previous one
    assert "--dependency" not in submits[0]
    for prev, cur in zip(scripts, submits[1:]):
        assert f"--dependency=afterok:${{JOB_{prev.upper()}}}" in cur
    d = scripts["distill"]
    assert "#SBATCH --nodes=32" in d and "#SBATCH --gpus-per-node=8" in d
    assert "#SBATCH --ntasks-per-node=8" in d and "#SBATCH --account=proj" in d
    assert "#SBATCH --requeue" in d and "#SBATCH --open-mode=append" in d
    assert "#SBATCH --signal=USR1@300" in d  # to the tasks: training saves, exits 75
    assert "scontrol requeue" in d and 'if true && [ "$rc" -eq 75 ]; then' in d
    assert "--container-image=./minitron-recipes+latest.sqsh" in d  # our build, not bare NeMo
    # this checkout at the workdir (code, conf/, relative run dirs), then the user's mounts
    assert f"--container-mounts={launch.ROOT}:/workspace/minitron-recipes,/lustre:/lustre" in d
    assert "parallel.tp=8 parallel.pp=1" in d and "python -m recipes.distill" in d
    p = scripts["prune"]
    assert "parallel.tp=1 parallel.pp=8" in p and "#SBATCH --ntasks-per-node=8" in p
    assert "--requeue" not in p and "--signal" not in p and "if false && " in p
    assert "#SBATCH --ntasks-per-node=1" in scripts["data"]
    assert "--gpus-per-node" not in scripts["data"]
    for s in scripts.values():
        assert "RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID" in s
        assert "MASTER_ADDR=$(scontrol show hostnames" in s


def test_layout_errors(capsys):
    with pytest.raises(ValueError, match="cluster.layout.prune.tp must be 1"):
        dry_run("llama31_8b_to_4b_width.yaml", "cluster.layout.prune.tp=2", capsys=capsys)
    with pytest.raises(ValueError, match="signal_grace_s=30: leave at least 60 s"):
        dry_run("llama31_8b_to_4b_width.yaml", "cluster.signal_grace_s=30", capsys=capsys)
    with pytest.raises(ValueError, match="is not a multiple of TP\\*PP=8\\*2"):
        dry_run("llama31_8b_to_4b_width.yaml", "cluster.layout.distill.pp=2",
                "cluster.nodes.distill=1", "cluster.gpus_per_node=4", capsys=capsys)


def test_missing_image_is_refused_before_anything_is_submitted(tmp_path):
    with pytest.raises(ValueError, match="container_image=./nope.sqsh does not exist: build it"):
        launch.main(["--config", str(CONF / "llama31_8b_to_4b_width.yaml"),
                     "cluster.container_image=./nope.sqsh", f"run.dir={tmp_path}"])
    assert not (tmp_path / "slurm").exists()
