"""Bad input fails before any work, with an error that names the fix, and writes nothing."""
import importlib.util
import json
import shutil

import pytest
import torch

from recipes import convert, export
from tests.conftest import TINY


def run_convert(tmp_path, src, *extra):
    return convert.main(["--config", TINY, f"run.dir={tmp_path / 'run'}",
                         f"convert.hf_path={src}", *extra])


def assert_nothing_written(tmp_path):
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir()), list(run.iterdir())


def broken_copy(hf_models, tmp_path, variant="gqa"):
    """A copy of a tiny HF folder to damage."""
    dst = tmp_path / "hf"
    shutil.copytree(hf_models[variant], dst)
    return dst


def _no_config(src):
    (src / "config.json").unlink()


def _gpt_neox(src):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))


def _six_layers(src):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 6}))


def _three_layers(src):  # a config.json that is not the weights': layer 3 would be dropped
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))


def _narrower_ffn(src):  # a config.json of a pruned sibling
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 95}))


def _no_last_shard(src):
    sorted(src.glob("model-*.safetensors"))[-1].unlink()


@pytest.mark.parametrize("damage, args, error, message", [
    (_no_config, (), FileNotFoundError,
     "config.json not found: point the stage at a Hugging Face model folder"),
    (_gpt_neox, (), ValueError, "model_type='gpt_neox' is not supported"),
    (_no_last_shard, (), FileNotFoundError,
     r"shard\(s\) \['model-00003-of-00003.safetensors'\].*missing; re-download"),
    (_six_layers, (), KeyError, "model.layers.4.* are not in the checkpoint"),
    (_three_layers, (), ValueError, r"the weights hold layer\(s\) \[3\] beyond config.json's "
                                    "num_hidden_layers=3, which would be dropped"),
    (_narrower_ffn, (), ValueError, r"model.layers.0.mlp.down_proj.weight is \[64, 96\] in the "
                                    r"weights, config.json implies \[64, 95\] \(12 tensor"),
    (lambda src: (src / "tokenizer.json").write_text(""), (), ValueError,
     r"convert.hf_path: .*tokenizer.json is empty \(0 bytes\)"),
    (None, ("parallel.tp=3",), ValueError, "parallel.tp=3 does not divide num_attention_heads=4"),
    (None, ("parallel.tp=4",), ValueError,
     r"parallel.tp=4 does not divide num_query_groups \(KV heads\)=2"),
    (None, ("parallel.pp=3",), ValueError, "parallel.pp=3 does not divide num_layers=4"),
], ids=["no-config", "gpt-neox", "missing-shard", "config-vs-weights", "layers-beyond-config",
        "shapes-vs-config", "empty-tokenizer",
        "tp-heads", "tp-groups",
        "pp-layers"])
def test_bad_checkpoint_or_layout_is_refused_before_work(hf_models, tmp_path, damage, args, error,
                                                         message):
    """A broken HF folder or an impossible layout fails naming the fix, and writes nothing."""
    src = hf_models["gqa"]
    if damage:
        src = broken_copy(hf_models, tmp_path)
        damage(src)
    with pytest.raises(error, match=message):
        run_convert(tmp_path, src, *args)
    assert_nothing_written(tmp_path)


def test_output_holds_a_different_run(hf_models, tmp_path):
    assert run_convert(tmp_path, hf_models["tied"]) == 0
    before = (tmp_path / "run" / "convert" / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="already holds a different convert run.*"
                                              "run.force=true"):
        run_convert(tmp_path, hf_models["gqa"])
    assert (tmp_path / "run" / "convert" / "manifest.json").read_text() == before


def test_output_dir_with_foreign_files(hf_models, tmp_path):
    (tmp_path / "run" / "convert").mkdir(parents=True)
    (tmp_path / "run" / "convert" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and has no manifest.json"):
        run_convert(tmp_path, hf_models["tied"])
    assert (tmp_path / "run" / "convert" / "notes.txt").read_text() == "mine"


def test_export_of_an_unfinished_stage(tmp_path):
    (tmp_path / "convert" / "checkpoint").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no megatron checkpoint.*a finished stage "
                       "of ours"):
        export.main(["--config", TINY, f"run.dir={tmp_path}"])
    assert not (tmp_path / "export").exists()


def test_failed_parity_publishes_nothing(hf_models, tmp_path):
    assert run_convert(tmp_path, hf_models["tied"]) == 0
    with pytest.raises(RuntimeError, match=r"export parity failed: max \|logit diff\| .* > "
                       r".*parity_rtol=0.0 x max \|logit\| .*not published"):
        export.main(["--config", TINY, f"run.dir={tmp_path / 'run'}", "export.dtype=bf16",
                     "export.parity_atol=1e-9", "export.parity_rtol=0"])
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None
                    and torch.cuda.is_available(), reason="a machine with TE builds spec=te")
@pytest.mark.parametrize("stage", ["prune", "distill", "teacher_correction", "export"])
def test_every_stage_takes_its_layer_spec_from_its_config(trained_run, tmp_path, stage):
    """Each stage that computes with a model resolves `<stage>.spec` through runtime.resolve_spec
    (none hard-codes one): spec=te without Transformer Engine is refused before any output."""
    from recipes import distill, prune, teacher_correction

    mod = {"prune": prune, "distill": distill, "teacher_correction": teacher_correction,
           "export": export}[stage]
    inputs = {"distill": f"distill.input={trained_run['run'] / 'convert'}",
              "export": f"export.input={trained_run['run'] / 'convert'}"}
    with pytest.raises(ValueError, match="spec=te needs Transformer Engine on a CUDA GPU"):
        mod.main(["--config", TINY, f"run.dir={trained_run['run']}", f"{stage}.spec=te",
                  f"{stage}.output={tmp_path / stage}", *([inputs[stage]] if stage in inputs
                                                          else [])])
    assert not (tmp_path / stage).exists() and not (tmp_path / f".{stage}.tmp").exists()


@pytest.mark.parametrize("slack, published", [(0.5, True), (2.0, False)])
def test_parity_bound_scales_with_the_largest_logit(hf_models, tmp_path, monkeypatch, slack,
                                                    published):
    """export.parity_rtol: HF logits off by `slack` x parity_rtol x max |logit| (a pruned model's
    fp32 summation-order noise is ~4e-4 of its ~30) pass at half the slack and fail at twice it,
    with parity_atol out of the way."""
    true_logits = export.hf_logits

    def off(folder, tokens):
        x = true_logits(folder, tokens)
        return x + slack * 1e-3 * x.abs().max()

    monkeypatch.setattr(export, "hf_logits", off)
    assert run_convert(tmp_path, hf_models["tied"]) == 0
    argv = ["--config", TINY, f"run.dir={tmp_path / 'run'}", "export.parity_atol=1e-9",
            "export.parity_rtol=1e-3"]
    if published:
        assert export.main(argv) == 0
        assert (tmp_path / "run" / "export" / "manifest.json").is_file()
    else:
        with pytest.raises(RuntimeError, match="export parity failed"):
            export.main(argv)
        assert not (tmp_path / "run" / "export").exists()
