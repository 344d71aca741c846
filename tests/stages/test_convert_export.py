"""HF -> Megatron -> HF round trips on tiny random Llamas: exact weights, logit parity with
transformers, at TP/PP 1 and 2 (torchrun), with resharding between the two."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from recipes import convert, export
from tests.conftest import TINY, torchrun


def hf_state(folder):
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def logits(folder, tokens):
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(tokens).logits


def assert_round_trip(src, run_dir):
    out = run_dir / "export"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["parity_max_abs_diff"] < 1e-4  # megatron vs exported HF
    a, b = hf_state(src), hf_state(out)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    tokens = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(1))
    diff = (logits(src, tokens) - logits(out, tokens)).abs().max().item()
    assert diff < 1e-4  # original HF vs exported HF
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    assert cfg["head_dim"] == src_cfg.get("head_dim", src_cfg["hidden_size"]
                                          // src_cfg["num_attention_heads"])
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert manifest["num_params"] == sum(t.numel() for t in a.values())


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_round_trip_single_process(hf_models, tmp_path, variant):
    src = hf_models[variant]
    assert convert.main(["--config", TINY, f"run.dir={tmp_path}", f"convert.hf_path={src}"]) == 0
    cm = json.loads((tmp_path / "convert" / "manifest.json").read_text())
    assert cm["arch"]["tie_embeddings"] is (variant == "tied")
    assert export.main(["--config", TINY, f"run.dir={tmp_path}"]) == 0
    assert_round_trip(src, tmp_path)


@pytest.mark.slow
def test_tp2_convert_then_tp1_export(hf_models, tmp_path):
    src = hf_models["gqa"]
    torchrun("recipes.convert", "--config", TINY, f"run.dir={tmp_path}",
             f"convert.hf_path={src}", "parallel.tp=2")
    assert json.loads((tmp_path / "convert" / "manifest.json").read_text())["parallel"]["tp"] == 2
    export.main(["--config", TINY, f"run.dir={tmp_path}"])  # resharded TP2 -> TP1 on load
    assert_round_trip(src, tmp_path)


@pytest.mark.slow
def test_tp1_convert_then_tp2_export(hf_models, tmp_path):
    src = hf_models["gqa"]
    convert.main(["--config", TINY, f"run.dir={tmp_path}", f"convert.hf_path={src}"])
    torchrun("recipes.export", "--config", TINY, f"run.dir={tmp_path}", "parallel.tp=2")
    assert_round_trip(src, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_pp2_convert_and_export(hf_models, tmp_path, variant):
    src = hf_models[variant]
    torchrun("recipes.convert", "--config", TINY, f"run.dir={tmp_path}",
             f"convert.hf_path={src}", "parallel.pp=2")
    torchrun("recipes.export", "--config", TINY, f"run.dir={tmp_path}", "parallel.pp=2")
    assert_round_trip(src, tmp_path)


def test_rerun_is_skipped_and_force_redoes(hf_models, tmp_path):
    args = ["--config", TINY, f"run.dir={tmp_path}", f"convert.hf_path={hf_models['tied']}"]
    convert.main(args)
    out = tmp_path / "convert"
    first = json.loads((out / "manifest.json").read_text())
    good_config = (out / "hf_config.json").read_bytes()
    # tamper with the finished output: a skipped rerun leaves it, a forced one rebuilds it
    (out / "hf_config.json").write_text("{}")
    (out / "stray.txt").write_text("not ours")
    convert.main(args)
    assert json.loads((out / "manifest.json").read_text())["started"] == first["started"]
    assert (out / "stray.txt").exists()  # skipped: untouched
    convert.main(args + ["run.force=true"])
    assert not (out / "stray.txt").exists()  # a new folder replaced the old one
    assert (out / "hf_config.json").read_bytes() == good_config
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == first["fingerprint"]
    leftovers = {p.name for p in tmp_path.glob(".convert.*")}
    assert leftovers == {".convert.lock"}  # no temp or old folders left behind, only the lock
