"""One YAML per recipe, one typed dataclass per section, dotted command-line overrides.

    python -m recipes.<stage> --config conf/tiny.yaml run.dir=runs/x parallel.tp=2

Precedence: dataclass defaults < YAML < command line. Sections chain through OmegaConf
interpolation (`export.input: ${run.dir}/convert`). Every section of the file is validated, so a
typo anywhere fails at the first stage, before any work, with the fix in the message.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import types
import typing
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from recipes.lib.errors import Refusal


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    dir: str
    """Run directory; each stage writes <dir>/<stage>/."""
    seed: int = 1234
    """Seed for every random number generator."""
    force: bool = False
    """Redo a stage whose output already exists (otherwise it is skipped)."""
    log_level: str = "INFO"
    """Logging level on rank 0: DEBUG | INFO | WARNING | ERROR."""

    def __post_init__(self):
        if not self.dir:
            raise Refusal("run.dir is empty; pass run.dir=runs/<name>")
        if self.log_level.upper() not in LOG_LEVELS:
            raise Refusal(f"run.log_level={self.log_level!r}; use one of {LOG_LEVELS}")
        self.log_level = self.log_level.upper()


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (must divide heads and KV groups)."""
    pp: int = 1
    """Pipeline-parallel size (must divide the layer count)."""
    ep: int = 1
    """Expert-parallel size of a mixture of experts (must divide the expert count): each group
    of EP data-parallel ranks shares out the experts, so TP*PP*EP must divide the ranks."""

    def __post_init__(self):
        for k in ("tp", "pp", "ep"):
            if getattr(self, k) < 1:
                raise Refusal(f"parallel.{k}={getattr(self, k)} must be >= 1")


@dataclasses.dataclass(kw_only=True)
class ModelInput:
    """The fields of a stage that reads one model checkpoint and writes one folder (prune,
    export, the training stages)."""
    input: str
    """The model: one of our checkpoint stage folders (convert, teacher_correction, prune,
    distill: which ones a stage takes is checked when it runs), or a Megatron-Bridge /
    Megatron-LM checkpoint folder (recipes/lib/interop.py)."""
    input_hf_config: str | None = None
    """Only for a Megatron-LM checkpoint as `input` (or one whose run_config.yaml should be
    overridden): the model's HF config.json, or an HF folder (its tokenizer is used too)."""
    output: str | None = None
    """Output folder; default <run.dir>/<stage>."""


# section -> "module:Class"; imported lazily so a stage does not import every other stage.
SECTIONS = {
    "run": "recipes.lib.config:RunConfig",
    "parallel": "recipes.lib.config:ParallelConfig",
    "data": "recipes.data:DataConfig",
    "convert": "recipes.convert:ConvertConfig",
    "teacher_correction": "recipes.teacher_correction:TeacherCorrectionConfig",
    "prune": "recipes.prune:PruneConfig",
    "distill": "recipes.distill:DistillConfig",
    "export": "recipes.export:ExportConfig",
    "evaluate": "recipes.evaluate:EvaluateConfig",
    "report": "recipes.report:ReportConfig",
    "plan": "recipes.plan:PlanConfig",
    "cluster": "recipes.lib.cluster:ClusterConfig",
}


class ConfigError(Refusal):
    pass


class Config(dict):
    """{section: dataclass}; sections also read as attributes (`cfg.run.dir`)."""

    merged = None  # the resolved-on-demand OmegaConf behind it (load)

    def typed(self, name: str):
        """Section `name` as its dataclass, values resolved and checked now: for a stage that
        needs another stage's settings only in some modes (prune's tournament uses distill's)."""
        if not isinstance(self.get(name), dict) or dataclasses.is_dataclass(self.get(name)):
            return self.get(name)
        self[name] = _coerce(_section_class(name), name, _resolved(self.merged, name))
        return self[name]

    def section(self, name: str):
        """Section `name` typed (`typed`), or its dataclass's defaults where the recipe has none
        (plan, cluster: every field has one)."""
        return self.typed(name) or _section_class(name)()

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise ConfigError(f"the config has no '{name}' section; add one to the YAML or pass "
                              f"{name}.<key>=... on the command line") from None


def _section_class(name: str) -> type:
    mod, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def _field_type(hints: dict, key: str):
    """A field's type, Optional[X] / X | None read as X."""
    t = hints[key]
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _coerce(cls: type, section: str, values: dict):
    """`values` checked and converted to the field types of dataclass `cls` (a nested dataclass
    field from a dict, recursively: `prune.search`); errors name `section.key` and the fix."""
    hints = typing.get_type_hints(cls)
    _check_keys(cls, section, values)
    out = {}
    for k, v in values.items():
        t = _field_type(hints, k)
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            out[k] = _coerce(t, f"{section}.{k}", v)
            continue
        try:
            if v is None or t in (typing.Any, object):
                out[k] = v
            elif t in (list, dict) or typing.get_origin(t) in (list, dict):
                if not isinstance(v, typing.get_origin(t) or t):
                    raise TypeError(f"expected a {t}")
                out[k] = v
            elif t is bool and isinstance(v, str):
                out[k] = {"true": True, "false": False}[v.lower()]
            elif t is bool and not isinstance(v, bool):
                raise TypeError("expected true or false")
            elif t is int and (isinstance(v, bool) or (isinstance(v, float) and not v.is_integer())):
                raise TypeError("expected a whole number")  # int(1.9) would silently give 1
            elif t is float and isinstance(v, bool):
                raise TypeError("expected a number")
            else:
                out[k] = t(v)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{section}.{k}={v!r} is not a valid {getattr(t, '__name__', t)}"
                              ) from e
    try:
        return cls(**out)
    except TypeError as e:
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in out and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"missing required key(s) "
                          f"{', '.join(f'{section}.{k}' for k in missing)}: set them in the YAML "
                          f"or on the command line ({section}.{missing[0] if missing else '?'}=...)"
                          ) from e
    except ValueError as e:
        raise ConfigError(f"[{section}] {e}") from e


def load(config_file: str | None, overrides: list[str], stage: str | None = None,
         also: tuple[str, ...] = ()) -> Config:
    """Resolve the YAML + overrides. `run`, `parallel`, the `stage` section and the `also`
    sections (present ones) become typed dataclasses (all values checked); every other section is
    checked for unknown keys only, so a typo anywhere fails early while other stages' required
    keys may stay unset."""
    base = OmegaConf.create({})
    if config_file:
        if not Path(config_file).is_file():
            raise ConfigError(f"--config {config_file}: no such file (see conf/ for recipes)")
        base = OmegaConf.load(config_file)
    bad = [o for o in overrides if "=" not in o or "." not in o.split("=", 1)[0]]
    if bad:
        raise ConfigError(f"override(s) {bad} must look like section.key=value")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot read the config: {e}") from e
    raw = OmegaConf.to_container(merged, resolve=False)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; valid sections: {sorted(SECTIONS)}")
    if "run" not in raw:
        raise ConfigError("no 'run' section: pass run.dir=runs/<name>")
    for name in SECTIONS:  # every key of every section first: a typo is named as a typo
        if name in raw:
            _check_keys(_section_class(name), name, raw[name] or {})
    out = Config()
    out.merged = merged
    for name in SECTIONS:
        if name in ("run", "parallel") or name == stage or (name in also and name in raw):
            out[name] = _coerce(_section_class(name), name, _resolved(merged, name))
        elif name in raw:  # other stages: keys only, values resolved when that stage runs
            out[name] = raw[name]
    return out


def _resolved(merged, name: str) -> dict:
    if name not in merged or merged[name] is None:
        return {}
    try:
        return OmegaConf.to_container(merged[name], resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{name}.{e.key} is required (the recipe leaves it '???'): pass "
                          f"{name}.{e.key}=... on the command line") from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve section '{name}': {e}") from e


def _check_keys(cls: type, section: str, values: dict) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                          f"valid keys of '{section}': {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    for k, v in values.items():  # nested sections (prune.search)
        t = _field_type(hints, k)
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            _check_keys(t, f"{section}.{k}", v)


def parse_args(argv: list[str] | None, stage: str, description: str,
               also: tuple[str, ...] = ()) -> Config:
    p = argparse.ArgumentParser(prog=f"python -m recipes.{stage}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML (conf/*.yaml)")
    p.add_argument("--args-file", help="a JSON list holding the arguments (--config and the "
                   "overrides), as the Slurm launcher writes them: no shell parses them")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    a = p.parse_args(argv)
    if a.args_file:
        a = p.parse_args(read_args_file(a.args_file))
    cfg = load(a.config, a.overrides, stage, also)
    if stage not in cfg:
        raise ConfigError(f"the config has no '{stage}' section; add one to the YAML or pass "
                          f"{stage}.<key>=... on the command line")
    return cfg


def read_args_file(path: str) -> list[str]:
    """The argument vector a launcher wrote to `path` (a JSON list of strings)."""
    try:
        args = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--args-file {path}: {e}") from e
    if not isinstance(args, list) or not all(isinstance(x, str) for x in args) \
            or "--args-file" in args:
        raise ConfigError(f"--args-file {path} must hold a JSON list of argument strings")
    return args


def to_yaml(cfg: Config) -> str:
    """The resolved config of the running stage (typed sections only)."""
    return OmegaConf.to_yaml({k: dataclasses.asdict(v) for k, v in cfg.items()
                              if dataclasses.is_dataclass(v)})


# Config fields added after stage folders were first written, each with the value that gives
# the results of before (a dense model's): at that value a field is left out of fingerprints and
# resume checks, so a finished folder or an unfinished run from before it existed is still
# recognised as the same run after an upgrade, not refused as another one.
ADDED_FIELDS = {"num_moe_experts": None, "moe_ffn_hidden_size": None,
                "target_active_params": None, "num_moe_experts_divisor": 8,
                "moe_aux_loss_coeff": 1e-3, "parity_rtol": 1e-3}


def without_added(v):
    """`v` (a config as dicts and lists) without the ADDED_FIELDS at their earlier-results value."""
    if isinstance(v, dict):
        return {k: without_added(x) for k, x in v.items()
                if not (k in ADDED_FIELDS and x == ADDED_FIELDS[k])}
    if isinstance(v, list):
        return [without_added(x) for x in v]
    return v
