"""Both directions with the real Megatron-Bridge (requirements-bridge.txt, installed into .bridge/
by `make bridge-env`; .ci/run prepares it). Bridge runs in subprocesses (tests/bridge/tool.py)
with its own transformers; our stages run here.

- Bridge -> ours: a checkpoint Bridge's AutoBridge imported from HF is `export.input`,
  `prune.input` and `distill.teacher` as is; the export equals the HF weights bit for bit, the
  pruned student equals the one pruned from our own convert, distillation learns from it.
- ours -> Bridge: our convert and distill folders load in Bridge's `load_megatron_model` (logits
  equal transformers' on our export) and its `export_ckpt` writes the HF weights of our export
  bit for bit.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from recipes import distill, export, prune
from tests.conftest import ROOT, TINY
from tests.stages.test_convert_export import hf_state, logits

BRIDGE = ROOT / ".bridge"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (BRIDGE / "megatron" / "bridge").is_dir(),
    reason="Megatron-Bridge is not installed: `make bridge-env` (scripts/bridge_env.sh) puts "
           "the pinned wheel into .bridge/")]


def bridge(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(BRIDGE), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "bridge" / "tool.py"), *map(str, args)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"bridge {args[0]} failed:\n{p.stdout[-2000:]}\n{p.stderr[-6000:]}"


def assert_same_weights(a_dir, b_dir):
    a, b = hf_state(a_dir), hf_state(b_dir)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), k


@pytest.fixture(scope="module")
def bridge_ckpt(trained_run, tmp_path_factory):
    """The trained tiny teacher imported by Megatron-Bridge (AutoBridge, fp32, local spec)."""
    out = tmp_path_factory.mktemp("bridge") / "ckpt"
    bridge("import", trained_run["hf"], out)
    assert (out / "latest_checkpointed_iteration.txt").is_file()
    assert (out / "iter_0000000" / "run_config.yaml").is_file()
    return out


def stage_args(run, *more):
    return ["--config", TINY, f"run.dir={run}", *more]


def test_a_bridge_checkpoint_feeds_our_stages(trained_run, bridge_ckpt, tmp_path):
    ours = trained_run["run"]  # data + our convert of the same HF model
    run = tmp_path / "run"
    # export: the HF weights Bridge imported, bit for bit; Bridge's unpadded vocabulary
    # (1001 rows) loads into our padded model (1024) with the rest zero
    assert export.main(stage_args(run, f"export.input={bridge_ckpt}")) == 0
    assert_same_weights(trained_run["hf"], run / "export")
    m = json.loads((run / "export" / "manifest.json").read_text())
    assert m["input"]["kind"] == "megatron-bridge"
    from recipes.lib import checkpoint, interop, runtime
    from recipes.lib import model as M

    src = interop.open_source(bridge_ckpt, "x", ())
    with runtime.distributed(1, 1):
        model = M.build(src.arch, dtype="fp32", init=True)  # random rows before the load
        checkpoint.load(model, src.weights, src.arch.vocab_size)
        for k in checkpoint.VOCAB_KEYS:
            w = model.state_dict()[k]
            assert w.shape[0] == 1024 and not w[1001:].any() and w[:1001].abs().sum() > 0, k
    # prune from Bridge's checkpoint = prune from our convert of the same weights
    for name, source in (("from_bridge", bridge_ckpt), ("from_ours", ours / "convert")):
        assert prune.main(stage_args(run, f"prune.input={source}", f"prune.data={ours / 'data'}",
                                     f"prune.output={run / name}")) == 0
        assert export.main(stage_args(run, f"export.input={run / name}",
                                      f"export.output={run / ('export_' + name)}")) == 0
    assert_same_weights(run / "export_from_bridge", run / "export_from_ours")
    # distill with Bridge's checkpoint as the teacher
    assert distill.main(stage_args(run, f"distill.input={run / 'from_bridge'}",
                                   f"distill.teacher={bridge_ckpt}",
                                   f"distill.data=[{ours / 'data'}]")) == 0
    d = json.loads((run / "distill" / "manifest.json").read_text())
    assert d["input"]["teacher"] == str(bridge_ckpt.resolve())
    rows = [json.loads(x) for x in (run / "distill" / "logs" / "metrics.jsonl").read_text()
            .splitlines()]
    valid = [r["valid_kd_loss"] for r in rows if "valid_kd_loss" in r]
    assert valid[-1] < valid[0]


def test_our_checkpoints_load_in_bridge(trained_run, tmp_path):
    ours = trained_run["run"]
    run = tmp_path / "run"
    assert prune.main(stage_args(run, f"prune.input={ours / 'convert'}",
                                 f"prune.data={ours / 'data'}")) == 0
    assert distill.main(stage_args(run, f"distill.teacher={ours / 'convert'}",
                                   f"distill.data=[{ours / 'data'}]")) == 0
    assert (run / "distill" / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    tokens = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    commands = []  # Bridge's, all in one process (its import costs seconds)
    for stage in ("convert", "distill"):
        folder = ours / stage if stage == "convert" else run / stage
        ref = tmp_path / f"ours_{stage}"
        assert export.main(stage_args(run, f"export.input={folder}",
                                      f"export.output={ref}")) == 0
        commands += ["+", "export", folder, ref, tmp_path / f"bridge_{stage}",
                     "+", "logits", folder, ref, tmp_path / "tokens.pt", tmp_path / f"{stage}.pt"]
    bridge(*commands[1:])
    for stage in ("convert", "distill"):
        ref = tmp_path / f"ours_{stage}"
        # Bridge's export_ckpt of our folder: our export's weights bit for bit
        assert_same_weights(ref, tmp_path / f"bridge_{stage}")
        # Bridge's load_megatron_model: the logits transformers computes on our export
        got = torch.load(tmp_path / f"{stage}.pt")
        vocab = json.loads((ref / "config.json").read_text())["vocab_size"]
        assert got.shape[-1] == vocab
        assert (got - logits(ref, tokens)).abs().max().item() < 1e-5, stage
