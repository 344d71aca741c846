"""Our checkpoint folders are Megatron-LM / Megatron-Bridge checkpoint roots, and such folders are
inputs to our stages (recipes/lib/interop.py). Needs no Bridge: Megatron-LM's own reader ships
in megatron-core's wheel (megatron/training); the tests with real Megatron-Bridge are in
test_bridge.py."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from recipes import convert, export
from recipes.lib import interop
from recipes.lib.arch import Arch
from tests.conftest import ROOT, TINY
from tests.stages.test_convert_export import hf_state
from tests.tiny_models import VARIANTS, write_tiny_llama


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("interop")
    hf = write_tiny_llama(base / "hf", "gqa")
    run = base / "run"
    common = ["--config", TINY, f"run.dir={run}", f"convert.hf_path={hf}"]
    assert convert.main(common) == 0
    assert export.main(common) == 0
    return {"hf": hf, "run": run}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_run_config_describes_the_architecture(tmp_path, variant):
    """Arch -> run_config.yaml -> Arch is the identity for every family and shape we test."""
    arch = Arch.from_hf_dir(write_tiny_llama(tmp_path / "hf", variant))
    f = tmp_path / "run_config.yaml"
    f.write_text(yaml.safe_dump(interop.run_config(arch, tp=2, pp=1, dtype="bf16",
                                                   spec="local")))
    assert interop.arch_from_run_config(f) == arch
    m = yaml.safe_load(f.read_text())["model"]
    assert m["should_pad_vocab"] is False and m["vocab_size"] == arch.vocab_size
    assert m["tensor_model_parallel_size"] == 2 and m["kv_channels"] == arch.head_dim


def test_run_config_refuses_what_it_cannot_express(tmp_path):
    f = tmp_path / "run_config.yaml"
    f.write_text(yaml.safe_dump({"model": {"num_layers": 2, "hidden_size": 8,
                                           "ffn_hidden_size": 8, "num_attention_heads": 2,
                                           "vocab_size": 10, "num_moe_experts": 8,
                                           "moe_shared_expert_intermediate_size": 16,
                                           "normalization": "LayerNorm"}}))
    with pytest.raises(ValueError, match="ungated shared expert.*normalization=LayerNorm"):
        interop.arch_from_run_config(f)
    f.write_text(yaml.safe_dump({"model": {"num_layers": 2}}))
    with pytest.raises(ValueError, match="model.num_attention_heads is missing"):
        interop.arch_from_run_config(f)


def test_a_stage_folder_is_a_megatron_lm_checkpoint(converted):
    """The layout, read by Megatron-LM's own code (megatron.training.checkpointing in the
    megatron-core wheel): tracker, iteration folder, common state with checkpoint_version 3.0
    (older versions make Megatron-LM reorder QKV) and the iteration."""
    root = converted["run"] / "convert"
    assert (root / interop.TRACKER).read_text().strip() == "0"
    assert (root / "iter_0000000" / "metadata.json").is_file()
    assert (root / "iter_0000000" / "run_config.yaml").is_file()
    script = f"""
import sys, types, typing, typing_extensions
typing.override = typing_extensions.override  # megatron.training is written for Python 3.12
from recipes.lib import compat; compat.apply()
from megatron.training import checkpointing as C
root = {str(root)!r}
it, release = C.read_metadata(C.get_checkpoint_tracker_filename(root))
args = types.SimpleNamespace(non_persistent_global_ckpt_dir=None, ckpt_step=None,
                             exit_on_missing_checkpoint=True, ckpt_format="torch_dist",
                             non_persistent_ckpt_type=None)
state, name, rel, kind = C._load_base_checkpoint(root, args, rank0=True)
print({{"iteration": it, "release": release, "name": name, "kind": str(kind),
       "common": {{k: v for k, v in state.items() if not hasattr(v, "shape")}}}})
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = eval(p.stdout.strip().splitlines()[-1])
    assert got == {"iteration": 0, "release": False, "name": str(root / "iter_0000000"),
                   "kind": "CheckpointType.GLOBAL",
                   "common": {"checkpoint_version": 3.0, "iteration": 0}}


def megatron_lm_copy(src, dst, tracker="0"):
    """A Megatron-LM-style folder of our checkpoint: tracker + iteration, no run_config.yaml,
    none of our files."""
    it = "release" if tracker == "release" else f"iter_{int(tracker):07d}"
    shutil.copytree(src / "iter_0000000", dst / it)
    (dst / it / "run_config.yaml").unlink()
    (dst / interop.TRACKER).write_text(tracker + "\n")
    return dst


@pytest.mark.parametrize("tracker", ["0", "release"])
def test_a_megatron_lm_checkpoint_is_an_input(converted, tmp_path, tracker):
    """Without run_config.yaml the architecture must be named; with the HF folder named, export
    writes the original weights bit for bit (and that folder's tokenizer)."""
    mlm = megatron_lm_copy(converted["run"] / "convert", tmp_path / "mlm", tracker)
    args = ["--config", TINY, f"run.dir={tmp_path / 'run'}", f"export.input={mlm}"]
    with pytest.raises(FileNotFoundError, match="without run_config.yaml.*export.input_hf_config="):
        export.main(args)
    assert export.main([*args, f"export.input_hf_config={converted['hf']}"]) == 0
    out = tmp_path / "run" / "export"
    a, b = hf_state(converted["hf"]), hf_state(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "tokenizer.json").is_file() and not list(out.glob("model-*-of-00002*"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["input"]["kind"] == "megatron-lm"
    assert m["input"]["weights"].endswith("release" if tracker == "release" else "iter_0000000")


def test_a_changed_megatron_lm_checkpoint_is_not_reused(converted, tmp_path):
    mlm = megatron_lm_copy(converted["run"] / "convert", tmp_path / "mlm")
    args = ["--config", TINY, f"run.dir={tmp_path / 'run'}", f"export.input={mlm}",
            f"export.input_hf_config={converted['hf']}"]
    assert export.main(args) == 0
    shard = next((mlm / "iter_0000000").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes())  # same bytes, new mtime: a rewritten checkpoint
    with pytest.raises(FileExistsError, match="input changed since"):
        export.main(args)


def test_wrong_architecture_or_layout_is_refused_by_name(converted, tmp_path):
    root = converted["run"] / "convert"
    mlm = megatron_lm_copy(root, tmp_path / "mlm")
    cfg = json.loads((converted["hf"] / "config.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    args = ["--config", TINY, f"run.dir={tmp_path / 'run'}", f"export.input={mlm}"]
    with pytest.raises(ValueError, match=r"linear_fc\d.weight is \[4, \d+, \d+\] there"):
        export.main([*args, f"export.input_hf_config={tmp_path / 'other.json'}"])
    (mlm / interop.TRACKER).write_text("7\n")
    with pytest.raises(FileNotFoundError, match="names iteration 7, but .*iter_0000007 holds no"):
        export.main([*args, f"export.input_hf_config={converted['hf']}"])
    (mlm / interop.TRACKER).write_text("latest\n")
    with pytest.raises(ValueError, match="not an iteration number or 'release'"):
        export.main([*args, f"export.input_hf_config={converted['hf']}"])


def test_load_allows_only_known_extra_state(converted, tmp_path):
    """Common-state keys Bridge / Megatron-LM write and a training checkpoint's optimizer state
    load; any other key in the checkpoint is refused by name."""
    from megatron.core.dist_checkpointing import ShardedTensor, save

    from recipes.lib import checkpoint, runtime
    from recipes.lib import model as M

    arch = Arch.from_dict(json.loads((converted["run"] / "convert" / "manifest.json")
                                     .read_text())["arch"])
    weights = converted["run"] / "convert" / "iter_0000000"
    with runtime.distributed(1, 1):
        m = M.build(arch, dtype="fp32", init=False)
        checkpoint.load(m, weights, arch.vocab_size)
        ref = {k: v.clone() for k, v in m.state_dict().items() if torch.is_tensor(v)}

        def written(name, extra):
            d = tmp_path / name
            d.mkdir()
            save({**m.sharded_state_dict(), **extra}, str(d))
            return d

        extra = torch.zeros(3)
        ok = written("ok", {"args": {"lr": 1.0}, "opt_param_scheduler": {"step": 3},
                            "optimizer": ShardedTensor.from_rank_offsets(
                                "optimizer.state.exp_avg.x", extra, replica_id=0)})
        m2 = M.build(arch, dtype="fp32", init=True)
        checkpoint.load(m2, ok, arch.vocab_size)
        assert all(torch.equal(ref[k], v) for k, v in m2.state_dict().items() if k in ref)
        bad = written("bad_common", {"surprise": 1})
        with pytest.raises(KeyError, match="surprise"):
            checkpoint.load(M.build(arch, dtype="fp32", init=False), bad, arch.vocab_size)
        bad = written("bad_tensor", {"x": ShardedTensor.from_rank_offsets(
            "decoder.extra.weight", extra, replica_id=0)})
        with pytest.raises(KeyError, match="decoder.extra.weight"):
            checkpoint.load(M.build(arch, dtype="fp32", init=False), bad, arch.vocab_size)
