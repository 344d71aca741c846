"""The config system: every recipe YAML loads; typos and bad values fail with the fix."""
import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recipes.lib import config

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("yaml", sorted(CONF.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(yaml):
    """Each stage section of each recipe type-checks; inputs the recipe leaves to the command
    line (required keys, '???') get a placeholder path, as a user would pass."""
    raw = OmegaConf.load(yaml)
    placeholders = [f"{sec}.{f.name}=/x" for sec in raw if sec in config.SECTIONS
                    for f in dataclasses.fields(config._section_class(sec))
                    if (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                        and f.name not in raw[sec])
                    or OmegaConf.is_missing(raw[sec], f.name)]
    stages = [s for s in raw if s not in ("run", "parallel")]
    assert stages, f"{yaml.name} configures no stage"
    for stage in stages:
        cfg = config.load(str(yaml), ["run.dir=/tmp/x", *placeholders], stage=stage)
        assert dataclasses.is_dataclass(cfg[stage]) and cfg.run.dir == "/tmp/x"


def test_precedence_defaults_yaml_cli(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("run:\n  dir: a\nexport:\n  input: ${run.dir}/convert\n  dtype: fp32\n")
    cfg = config.load(str(y), ["export.parity_atol=0.5", "run.dir=b"], stage="export")
    assert cfg.export.dtype == "fp32"                 # YAML over default
    assert cfg.export.parity_atol == 0.5              # command line over default
    assert cfg.export.input == "b/convert"            # interpolation sees the override
    assert cfg.export.shard_size_mb == 5000           # default


@pytest.mark.parametrize("overrides, message", [
    (["convert.hf_pth=x"], "unknown key(s) convert.hf_pth"),
    (["bogus.key=1"], "unknown section(s) ['bogus']"),
    (["export.parity_atol=abc"], "export.parity_atol='abc' is not a valid float"),
    (["export.dtype=fp8"], "export.dtype='fp8'; use one of"),
    (["parallel.tp=0"], "parallel.tp=0 must be >= 1"),
    (["export.dtype"], "must look like section.key=value"),
    (["export.input=x", "run.force=maybe"], "run.force='maybe' is not a valid bool"),
])
def test_bad_values_name_the_fix(overrides, message):
    with pytest.raises(config.ConfigError) as e:
        config.load(str(CONF / "tiny.yaml"), ["run.dir=/tmp/x", *overrides], stage="export")
    assert message in str(e.value)


def test_missing_required_key():
    with pytest.raises(config.ConfigError, match=r"missing required key\(s\) convert.hf_path"):
        config.load(str(CONF / "tiny.yaml"), ["run.dir=/tmp/x"], stage="convert")


def test_typo_in_another_stage_fails_early(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("run:\n  dir: a\nconvert:\n  hf_path: x\nexport:\n  inptu: y\n")
    with pytest.raises(config.ConfigError, match="export.inptu"):
        config.load(str(y), [], stage="convert")


def test_speed_models_checked_only_when_timing():
    """make demo-compare scores students without the teacher and with speed off: the demo's
    speed_models (teacher, distilled) must not block it; with speed on they must name the
    reference."""
    common = ["run.dir=/tmp/x", "evaluate.include=[distilled,ce_trained]"]
    cfg = config.load(str(CONF / "demo.yaml"), [*common, "evaluate.speed=false"],
                      stage="evaluate")
    assert list(cfg.evaluate.models) == ["distilled", "ce_trained"]
    with pytest.raises(config.ConfigError, match="must name models being scored"):
        config.load(str(CONF / "demo.yaml"), [*common, "evaluate.speed=true"], stage="evaluate")
