"""A stage folder or an unfinished run written before a config field existed is still the same
run after an upgrade (recipes/lib/stage.py ADDED_FIELDS): its fingerprint and resume check are
those of before while the new fields keep their earlier-results values, and change when one is
set."""
import dataclasses
import hashlib
import json

from recipes import prune
from recipes.lib import config, stage
from recipes.lib.train_config import KDConfig
from tests.conftest import TINY


def before(section, extra: dict, new: tuple, ignore=()) -> str:
    """The fingerprint as the release before `new` fields wrote it."""
    cfg = {k: v for k, v in dataclasses.asdict(section).items()
           if k not in ignore and k not in new}
    blob = json.dumps({"cfg": cfg, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_fields_added_at_their_default_keep_fingerprints_and_resumes(tmp_path):
    cfg = config.load(TINY, ["run.dir=/r", "convert.hf_path=/m", "data.input=/d"], "prune")
    p: prune.PruneConfig = cfg.prune
    extra = {"pp": 1, "seed": 1234}
    moe = ("num_moe_experts", "moe_ffn_hidden_size", "target_active_params")
    assert stage.fingerprint(p, extra) == before(p, extra, moe)
    assert stage.fingerprint(dataclasses.replace(p, num_moe_experts=4), extra) != \
        before(p, extra, moe)

    d: KDConfig = config.load(TINY, ["run.dir=/r", "convert.hf_path=/m"], "distill").distill
    assert stage.fingerprint(d, extra) == before(d, extra, ("moe_aux_loss_coeff",))
    resumable = {**dataclasses.asdict(d), **extra}
    old = {k: v for k, v in resumable.items() if k != "moe_aux_loss_coeff"}  # an older run.json
    mark = tmp_path / "run.json"
    mark.write_text(json.dumps(old))
    assert stage.differences(mark, resumable) == ""
    assert stage.differences(mark, {**resumable, "moe_aux_loss_coeff": 0.02}) == \
        "moe_aux_loss_coeff: None -> 0.02"
