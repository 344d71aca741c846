"""Bad input fails before any work, with an error that names the fix, and writes nothing."""
import json
import shutil

import pytest

from recipes import convert, export
from tests.conftest import TINY


def run_convert(tmp_path, src, *extra):
    return convert.main(["--config", TINY, f"run.dir={tmp_path / 'run'}",
                         f"convert.hf_path={src}", *extra])


def assert_nothing_written(tmp_path):
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir()), list(run.iterdir())


def broken_copy(hf_models, tmp_path, variant="gqa"):
    dst = tmp_path / "hf"
    shutil.copytree(hf_models[variant], dst)
    return dst


def test_missing_config_json(hf_models, tmp_path):
    src = broken_copy(hf_models, tmp_path)
    (src / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found: point the stage at a "
                                                "Hugging Face model folder"):
        run_convert(tmp_path, src)
    assert_nothing_written(tmp_path)


def test_non_llama_config(hf_models, tmp_path):
    src = broken_copy(hf_models, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="model_type='gpt_neox' is not supported"):
        run_convert(tmp_path, src)
    assert_nothing_written(tmp_path)


def test_missing_shard(hf_models, tmp_path):
    src = broken_copy(hf_models, tmp_path)
    victim = sorted(src.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard\\(s\\) \\['{victim.name}'\\].*missing; "
                                                "re-download"):
        run_convert(tmp_path, src)
    assert_nothing_written(tmp_path)


def test_weights_disagree_with_config(hf_models, tmp_path):
    src = broken_copy(hf_models, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 6}))
    with pytest.raises(KeyError, match="model.layers.4.* are not in the checkpoint"):
        run_convert(tmp_path, src)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("tp, what", [(3, "num_attention_heads=4"),
                                      (4, "num_query_groups \\(KV heads\\)=2")])
def test_tp_must_divide_heads_and_groups(hf_models, tmp_path, tp, what):
    with pytest.raises(ValueError, match=f"parallel.tp={tp} does not divide {what}"):
        run_convert(tmp_path, hf_models["gqa"], f"parallel.tp={tp}")
    assert_nothing_written(tmp_path)


def test_pp_must_divide_layers(hf_models, tmp_path):
    with pytest.raises(ValueError, match="parallel.pp=3 does not divide num_layers=4"):
        run_convert(tmp_path, hf_models["gqa"], "parallel.pp=3")
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
    with pytest.raises(RuntimeError, match="export parity failed.*not published"):
        export.main(["--config", TINY, f"run.dir={tmp_path / 'run'}", "export.dtype=bf16",
                     "export.parity_atol=1e-9"])
    assert not (tmp_path / "run" / "export").exists()
