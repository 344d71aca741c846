"""Minitron pruning with ModelOpt on a briefly trained tiny Llama: exact target dims and
parameter counts, importance beats random, the paper's contiguous depth choice agrees with brute
force, PP=2 equals PP=1, and bad targets fail before any weights load."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from recipes import export, prune
from recipes.lib import tokens
from recipes.lib.arch import Arch
from tests.conftest import TINY, torchrun
from tests.stages.test_convert_export import hf_state

SEQ = 64  # prune.seq_length in conf/tiny.yaml


def run_prune(trained_run, out, *extra, nproc=1):
    args = ["--config", TINY, f"run.dir={trained_run['run']}",
            f"convert.hf_path={trained_run['hf']}", f"prune.output={out}", *extra]
    if nproc == 1:
        prune.main(args)
    else:
        torchrun("recipes.prune", *args, nproc=nproc)
    return json.loads((out / "manifest.json").read_text())


def export_hf(trained_run, src, out):
    export.main(["--config", TINY, f"run.dir={trained_run['run']}", f"export.input={src}",
                 f"export.output={out}"])
    return out


def hf_loss(model, windows):
    with torch.no_grad():
        logits = model(windows[:, :-1], use_cache=False).logits
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()


def test_targets_and_parameter_counts(trained_run, tmp_path):
    m = run_prune(trained_run, tmp_path / "p", "prune.num_layers=3")
    a = Arch.from_dict(m["arch"])
    assert (a.hidden_size, a.ffn_hidden_size, a.num_attention_heads, a.num_layers) == \
        (48, 64, 2, 3)
    assert a.num_query_groups == 2 and a.head_dim == 24  # groups and head_dim kept
    out = export_hf(trained_run, tmp_path / "p", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in hf.parameters()) == a.num_params() == m["num_params"]
    assert hf.config.head_dim == 24 and hf.config.hidden_size == 48
    imp = json.loads((tmp_path / "p" / "importance.json").read_text())
    assert len(imp["heads"]) == 4 and all(len(h) == 4 for h in imp["heads"].values())
    assert len(imp["channels"]) == 64 and imp["depth"]["method"] == "contiguous"
    assert len(imp["depth"]["candidates"]) == 4


def random_width_prune(teacher, hidden, ffn, heads_per_group, seed):
    """Reference random pruning in HF terms: keep random channels / neurons / heads."""
    g = torch.Generator().manual_seed(seed)
    cfg = teacher.config
    keep_h = torch.randperm(cfg.hidden_size, generator=g)[:hidden].sort().values
    d, groups = cfg.head_dim, cfg.num_key_value_heads
    per = cfg.num_attention_heads // groups
    new_cfg = copy.deepcopy(cfg)
    new_cfg.hidden_size, new_cfg.intermediate_size = hidden, ffn
    new_cfg.num_attention_heads = heads_per_group * groups
    student = type(teacher)(new_cfg)
    sd, new = teacher.state_dict(), {}
    for k, v in sd.items():
        if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight"):
            new[k] = v[:, keep_h]
        elif "norm" in k:
            new[k] = v[keep_h]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        keep_f = torch.randperm(cfg.intermediate_size, generator=g)[:ffn].sort().values
        heads = torch.cat([gi * per + torch.randperm(per, generator=g)[:heads_per_group]
                           for gi in range(groups)])
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
        new[p + "self_attn.q_proj.weight"] = sd[p + "self_attn.q_proj.weight"][rows][:, keep_h]
        for kv in "kv":
            new[p + f"self_attn.{kv}_proj.weight"] = sd[p + f"self_attn.{kv}_proj.weight"][:,
                                                                                         keep_h]
        new[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][keep_h][:, rows]
        for n in ("gate", "up"):
            new[p + f"mlp.{n}_proj.weight"] = sd[p + f"mlp.{n}_proj.weight"][keep_f][:, keep_h]
        new[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][keep_h][:, keep_f]
    student.load_state_dict(new, strict=True)
    return student.eval()


def test_activation_importance_beats_random(trained_run, tmp_path):
    run_prune(trained_run, tmp_path / "p")  # width only: 64->48 hidden, 96->64 ffn, 4->2 heads
    pruned = AutoModelForCausalLM.from_pretrained(
        export_hf(trained_run, tmp_path / "p", tmp_path / "hf")).eval()
    teacher = AutoModelForCausalLM.from_pretrained(trained_run["hf"]).eval()
    test = tokens.windows(trained_run["run"] / "data", "test", SEQ, 8, seed=0)
    ours = hf_loss(pruned, test)
    rand = [hf_loss(random_width_prune(teacher, 48, 64, 1, seed), test) for seed in range(3)]
    print(f"held-out loss: teacher {hf_loss(teacher, test):.3f}, activation importance "
          f"{ours:.3f}, random {[round(r, 3) for r in rand]}")
    assert ours < min(rand)


def test_contiguous_depth_matches_brute_force(trained_run, tmp_path):
    run_prune(trained_run, tmp_path / "p", "prune.num_layers=2")
    imp = json.loads((tmp_path / "p" / "importance.json").read_text())["depth"]
    heldout = tokens.windows(trained_run["run"] / "data", "valid", SEQ, 8, seed=1234 + 1)
    teacher = AutoModelForCausalLM.from_pretrained(trained_run["hf"]).eval()
    brute = {}
    for start in range(1, 4):  # blocks of 2 among 4 layers, 1-indexed
        m = copy.deepcopy(teacher)
        m.model.layers = torch.nn.ModuleList(
            [layer for i, layer in enumerate(m.model.layers) if i + 1 not in (start, start + 1)])
        m.config.num_hidden_layers = 2
        brute[start] = hf_loss(m, heldout)
    best = min(brute, key=brute.get)
    assert imp["drop_layers_1indexed"] == [best, best + 1]
    assert imp["hf_layers_dropped_0indexed"] == [best - 1, best]
    for row in imp["candidates"]:
        assert row["loss"] == pytest.approx(brute[row["drop_layers"][0]], abs=1e-4)


def kept_teacher_layers(teacher_hf, student_hf):
    """For each student layer, the teacher layer whose weights it holds (depth-only prune:
    kept layers keep their values), read from the weights themselves."""
    t, s = hf_state(teacher_hf), hf_state(student_hf)
    n_t = 1 + max(int(k.split(".")[2]) for k in t if k.startswith("model.layers."))
    n_s = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("model.layers."))
    key = "model.layers.{}.mlp.down_proj.weight"

    def values(sd, i):  # ModelOpt may reorder channels by importance: compare the multiset
        return sd[key.format(i)].flatten().sort().values

    return [next(j for j in range(n_t) if torch.equal(values(s, i), values(t, j)))
            for i in range(n_s)]


def test_drop_layers_and_block_influence(trained_run, tmp_path):
    full_width = ["prune.hidden_size=64", "prune.ffn_hidden_size=96",
                  "prune.num_attention_heads=4"]  # the teacher's: only depth changes
    m = run_prune(trained_run, tmp_path / "d", "prune.depth_method=drop_layers",
                  "prune.drop_layers=[2,3]", *full_width)
    assert m["arch"]["num_layers"] == 2 and m["depth"]["hf_layers_dropped_0indexed"] == [1, 2]
    assert kept_teacher_layers(trained_run["hf"], export_hf(
        trained_run, tmp_path / "d", tmp_path / "dh")) == [0, 3]
    b = run_prune(trained_run, tmp_path / "b", "prune.depth_method=block_influence",
                  "prune.num_layers=3", *full_width)
    assert b["arch"]["num_layers"] == 3 and len(b["depth"]["drop_layers_1indexed"]) == 1
    # what ModelOpt removed, from the weights, agrees with what the manifest says...
    kept = kept_teacher_layers(trained_run["hf"], export_hf(trained_run, tmp_path / "b",
                                                             tmp_path / "bh"))
    dropped = sorted(set(range(4)) - set(kept))
    assert kept == sorted(kept) and len(dropped) == 1
    assert b["depth"]["hf_layers_dropped_0indexed"] == dropped
    # ...and is the layer with the lowest block influence (1 - cosine of its input and output)
    scores = json.loads((tmp_path / "b" / "importance.json").read_text())[
        "layer_scores_block_influence"]
    assert int(min(scores, key=scores.get)) == dropped[0] + 1


@pytest.mark.slow
def test_pp2_gives_the_same_pruned_weights(trained_run, tmp_path):
    run_prune(trained_run, tmp_path / "pp1", "prune.num_layers=2")
    run_prune(trained_run, tmp_path / "pp2", "prune.num_layers=2", "parallel.pp=2", nproc=2)
    a = load_file(next(export_hf(trained_run, tmp_path / "pp1", tmp_path / "h1")
                       .glob("*.safetensors")))
    b = load_file(next(export_hf(trained_run, tmp_path / "pp2", tmp_path / "h2")
                       .glob("*.safetensors")))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("extra, message", [
    (["parallel.tp=2"], "requires TP=1; prune with parallel.tp=1 parallel.pp=N"),
    (["prune.hidden_size=128"], "prune.hidden_size=128 must be between 1 and the teacher's 64"),
    (["prune.num_attention_heads=3"], "must be a multiple of the 2 KV groups"),
    (["prune.hidden_size=47"], "47 is not a multiple of num_attention_heads=2: transformers"),
    (["prune.num_layers=9"], "prune.num_layers=9 must be between 1 and the teacher's 4"),
    (["prune.depth_method=drop_layers", "prune.drop_layers=[0,2]"],
     "prune.drop_layers has \\[0\\] outside 1..4 \\(the list is 1-indexed"),
    (["prune.depth_method=drop_layers", "prune.drop_layers=[2,2]"], "lists \\[2\\] more than once"),
    (["prune.calib_samples=100000"], "needs 100000 windows of 65 tokens from the train split"),
    (["prune.drop_layers=[1]"], "set prune.depth_method=drop_layers"),
    (["prune.num_layers=3", "parallel.pp=2"], "3 layers do not divide into parallel.pp=2"),
])
def test_bad_targets_fail_before_loading(trained_run, tmp_path, extra, message):
    with pytest.raises(Exception, match=message):
        run_prune(trained_run, tmp_path / "p", *extra)
    assert not (tmp_path / "p").exists() and not (tmp_path / ".p.tmp").exists()
