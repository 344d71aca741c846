"""Prune to a budget: ModelOpt's search under a parameter target, the candidate filter, and the
short-distillation tournament, whose winner is checked independently with transformers
(recipes/lib/search.py)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import export, prune
from recipes.lib import search, tournament
from recipes.lib.arch import Arch
from tests.conftest import TINY

SEARCH = "{top_k: 3, hidden_size_divisor: 16, ffn_hidden_size_divisor: 16, " \
         "num_layers_divisor: 1, max_depth_pruning: 0.5%s}"
NO_SIZES = ["prune.hidden_size=null", "prune.ffn_hidden_size=null",
            "prune.num_attention_heads=null"]


def prune_args(run, out, *more):
    return ["--config", TINY, f"run.dir={run}", f"prune.output={out}", *NO_SIZES, *more]


def test_the_filter_rejects_shapes_transformers_cannot_load():
    t = Arch(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
             num_query_groups=2, head_dim=24, vocab_size=1001, tie_embeddings=False,
             rope_theta=1e4, rope_scaling_factor=None, norm_eps=1e-6,
             max_position_embeddings=4096)
    ok = search.candidate_filter(t, pp=1)
    assert ok({"hidden_size": 48, "num_attention_heads": 4, "ffn_hidden_size": 64,
               "num_layers": 3})
    assert not ok({"hidden_size": 50, "num_attention_heads": 4})  # hidden % heads
    assert not ok({"num_attention_heads": 3})                     # heads % KV groups
    assert not search.candidate_filter(t, pp=2)({"num_layers": 3})  # the output's PP


def test_settings_and_targets_are_checked_before_work(trained_run, tmp_path):
    run = trained_run["run"]
    for extra, msg in (
            (["prune.target_params=0.8", "prune.hidden_size=32"], "unset \\['hidden_size'\\]"),
            (["prune.target_params=0.8", "prune.target_memory_mb=10"], "not several"),
            (["prune.target_params=0.8", "prune.search={topk: 3}"], "unknown key.*topk"),
            (["prune.target_params=0.8", "prune.search={max_width_pruning: 1.5}"], "in \\[0, 1\\)"),
            (["prune.search={top_k: 3}"], "no prune.target_params"),
            (["prune.target_params=0.8", "prune.search={tournament_steps: 2, "
              "tournament_tokens: 512}"], "not both"),
            (["prune.target_params=0.8", "prune.search={score: mmlu}"], "kd_loss"),
            (["prune.target_params=0.8", "prune.search={teacher_cache_top_k: 0}"], ">= 1"),
            (["prune.target_params=0.8", "prune.search={score: lm_eval}"], "go together"),
            (["prune.target_params=0.8", "prune.search=" + SEARCH % (
                ", tournament_steps: 2, score: lm_eval, lm_eval_task: no_such_task")],
             "lm-eval has no task 'no_such_task'"),
            (["prune.target_params=-1"], "must be > 0"),
            (["prune.target_params=5e9"], "at or above the teacher's own .*nothing to prune"),
            (["prune.target_memory_mb=1e6"], "at or above the teacher's own .*nothing to prune"),
            (["prune.target_params=0.05", f"prune.search={SEARCH % ''}"],
             "no shape on the search grid meets prune.target_params .*the smallest reachable is"),
            (["prune.target_params=0.85"],  # ModelOpt's default grid: 256 / 512 on a 64 / 96 model
             "hidden_size, ffn_hidden_size, num_attention_heads, num_layers cannot shrink")):
        with pytest.raises(Exception, match=msg):
            prune.main(["--config", TINY, f"run.dir={run}", f"prune.output={tmp_path / 'p'}",
                        *(x for x in NO_SIZES if x.split("=")[0] not in
                          {e.split("=")[0] for e in extra}), *extra])
    assert not (tmp_path / "p").exists()


def kd_loss_with_transformers(teacher_dir, student_dir, dc, seed, cache):
    """The held-out KD loss of the tournament (the validation batches distill's loop uses), with
    transformers models and plain torch: KL(teacher || student) per token over the real vocab."""
    from recipes.lib import batches, runtime, train

    t = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    s = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    with runtime.distributed(1, 1):
        _, valid = batches.datasets(dc, seed, cache)
        batches = [b for i in range(dc.eval_iters) for b in batches.micro_batches(
            valid, i, dc, train.check_layout(dc, 1))]
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            lt = t(b["tokens"]).logits.float().log_softmax(-1)
            ls = s(b["tokens"]).logits.float().log_softmax(-1)
            kl = (lt.exp() * (lt - ls)).sum(-1)
            total += (kl * b["loss_mask"]).sum().item()
            n += b["loss_mask"].sum().item()
    return total / n


def test_search_and_tournament(trained_run, tmp_path):
    """Every candidate meets the target; the tournament trains each for the same steps and
    data, the winner has the lowest held-out KD loss, and transformers computes the same KD
    losses from the exported candidates (so the ranking is the models', not the recipe's
    bookkeeping). The output is the winner as pruned, and exports."""
    run, out = trained_run["run"], tmp_path / "prune"
    assert prune.main(prune_args(run, out, "prune.target_params=0.85",
                                 f"prune.search={SEARCH % ', tournament_steps: 4, keep_tournament: true'}")
                      ) == 0
    res = json.loads((out / "search.json").read_text())
    m = json.loads((out / "manifest.json").read_text())
    target = res["constraint"]["params"]
    assert target == pytest.approx(0.85 * res["teacher_params"])
    cands = res["candidates"]
    assert len(cands) == 3 and res["decided_by"] == "tournament"
    for cand in cands:
        assert cand["params"] <= cand["modelopt_params"] <= target
        assert cand["arch"]["hidden_size"] % cand["arch"]["num_attention_heads"] == 0
    winner = min(cands, key=lambda x: x["tournament_kd_loss"])
    assert winner["winner"] and res["winner"] == winner["candidate"] == m["search"]["winner"]
    assert {k: m["arch"][k] for k in winner["arch"]} == winner["arch"]
    assert res["tournament"]["tokens_per_candidate"] == 4 * 4 * 64
    for cand in cands:  # each candidate logs its speed like a distill run (model FLOPs too)
        rows = (out / "tournament" / f"c{cand['candidate']}" / "logs" / "metrics.jsonl").open()
        assert all(json.loads(r)["model_tflops_per_rank"] > 0 for r in list(rows)[1:])
    # independent check: export each tournament-distilled candidate and the teacher, and compute
    # the same held-out KD loss with transformers
    teacher_hf = tmp_path / "teacher_hf"
    assert export.main(["--config", TINY, f"run.dir={run}", f"export.input={run / 'convert'}",
                        f"export.output={teacher_hf}"]) == 0
    from recipes.lib.config import load

    dc = tournament.tournament_config(load(TINY, [f"run.dir={run}"], stage="distill").distill, 4)
    ours = {}
    for cand in cands:
        hf = tmp_path / f"c{cand['candidate']}_hf"
        assert export.main(["--config", TINY, f"run.dir={run}",
                            f"export.input={out / 'tournament' / ('c%d' % cand['candidate'])}",
                            f"export.output={hf}"]) == 0
        ours[cand["candidate"]] = kd_loss_with_transformers(teacher_hf, hf, dc, 1234,
                                                            tmp_path / "cache")
        assert ours[cand["candidate"]] == pytest.approx(cand["tournament_kd_loss"], rel=1e-4)
    assert min(ours, key=ours.get) == winner["candidate"]
    # the output is the winner as pruned (before its short distillation), and it exports
    assert export.main(["--config", TINY, f"run.dir={run}", f"export.input={out}",
                        f"export.output={tmp_path / 'winner_hf'}"]) == 0
    assert not (out / "run.json").exists() and not (out / "candidates").exists()


def test_zero_shot_search_and_resume(trained_run, tmp_path, monkeypatch):
    """Without a tournament ModelOpt's zero-shot best wins. A tournament killed after its first
    candidate resumes there: the finished candidate is not trained again."""
    run = trained_run["run"]
    out = tmp_path / "zs"
    assert prune.main(prune_args(run, out, "prune.target_params=0.85",
                                 f"prune.search={SEARCH % ''}")) == 0
    res = json.loads((out / "search.json").read_text())
    best = min(res["candidates"], key=lambda x: x["zero_shot_lm_loss"])
    assert res["decided_by"] == "zero-shot" and best["winner"]
    assert "tournament_kd_loss" not in best

    out = tmp_path / "t"  # a budget in tokens (2 steps of 4 x 64), ranked by held-out LM loss
    argv = prune_args(run, out, "prune.target_params=0.85",
                      f"prune.search={SEARCH % ', tournament_tokens: 400, score: lm_loss'}")
    real = tournament.run_tournament

    def killed_after_one(cands, folders, *a, **k):
        real(cands[:1], folders[:1], *a, **k)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tournament, "run_tournament", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        prune.main(argv)
    assert (out.with_name(".t.tmp") / "tournament" / "c1" / "result.json").is_file()
    monkeypatch.setattr(tournament, "run_tournament", real)
    from recipes.lib import train

    calls, orig = [], train.train

    def counting(c, work, *a, **k):
        calls.append(work.name)
        return orig(c, work, *a, **k)

    monkeypatch.setattr(train, "train", counting)
    assert prune.main(argv) == 0
    assert calls == ["c2", "c3"]  # c1 was reused, not retrained
    res = json.loads((out / "search.json").read_text())
    assert all("tournament_kd_loss" in c for c in res["candidates"])
    assert res["tournament"]["steps"] == 2 and res["tournament"]["tokens_per_candidate"] == 512
    best = min(res["candidates"], key=lambda x: x["tournament_lm_loss"])
    assert best["winner"] and "LM loss" in res["tournament"]["score"]


@pytest.mark.slow
def test_cached_teacher_logits_equal_online(trained_run, tmp_path):
    """The tournament's teacher logits, recorded once and replayed to every candidate, give the
    KD and LM losses the online teacher gives (fp32), also split over two pipeline stages. A
    disk budget the full vocabulary does not fit switches to top-K logits, sized to it."""
    from recipes.lib import logit_cache
    from tests.conftest import torchrun

    run, res = trained_run["run"], {}
    # width only: the same candidates at PP=1 and PP=2 (which needs even layer counts)
    search_2 = SEARCH.replace("top_k: 3", "top_k: 2, hparams: [hidden_size, ffn_hidden_size, "
                              "num_attention_heads]")
    for name, cache in (("cached", "teacher_cache: true"), ("online", "teacher_cache: false"),
                        ("top_k", "teacher_cache_max_gb: 0.001"), ("pp2", "teacher_cache: true")):
        out = tmp_path / name
        argv = prune_args(run, out, "prune.target_params=0.85", "prune.search=" + search_2 % (
            f", tournament_steps: 3, {cache}"))
        if name == "pp2":
            torchrun("recipes.prune", *argv, "parallel.pp=2")
        else:
            assert prune.main(argv) == 0
        res[name] = json.loads((out / "search.json").read_text())
    cached, online = res["cached"], res["online"]
    assert cached["tournament"]["teacher"] == "logits cached once and replayed"
    assert cached["tournament"]["teacher_cache"]["encoding"] == "full"
    assert cached["tournament"]["teacher_cache_mb"] > 0
    assert online["tournament"]["teacher"] == "run online"
    for a, b, c in zip(cached["candidates"], online["candidates"], res["pp2"]["candidates"]):
        assert a["ss_config"] == b["ss_config"] == c["ss_config"]
        for k in ("tournament_kd_loss", "tournament_lm_loss"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), k
            assert c[k] == pytest.approx(b[k], abs=1e-5), k
    assert res["pp2"]["tournament"]["teacher_cache"]["encoding"] == "full"
    # top-K: the largest power of two that fits 1 MB for these tokens; the KD losses move by
    # about what the tail's flattened spread is worth, the LM losses barely
    top = res["top_k"]["tournament"]["teacher_cache"]
    dc = tournament.tournament_config(_distill_cfg(run), 3)
    n = (dc.train_iters + dc.eval_iters) * dc.global_batch_size  # sequences = files
    want = logit_cache.choose(n * dc.seq_length, n, 1024, 1001, "fp32", None, 0.001)
    assert top["encoding"] == "top-k" and top["top_k"] == want["top_k"] < 1001
    assert top["mb"] <= 0.001 * 1024 < want["full_mb"]  # GiB -> MiB
    assert 0 < top["tail_mass_mean"] <= top["tail_mass_max"] < 1
    for a, b in zip(res["top_k"]["candidates"], online["candidates"]):
        assert a["tournament_kd_loss"] == pytest.approx(b["tournament_kd_loss"], rel=1e-2)
    assert not list(tmp_path.rglob("teacher_logits"))  # the cache is not part of the output


def _distill_cfg(run):
    from recipes.lib.config import load

    return load(TINY, [f"run.dir={run}"], stage="distill").distill


def test_tournament_ranked_by_an_lm_eval_task(trained_run, tmp_path):
    """score=lm_eval: each tournament-distilled candidate's accuracy on a local multiple-choice
    task, run offline by the real harness, equals an independent transformers computation on
    that candidate's export; the winner has the highest."""
    pytest.importorskip("lm_eval")
    from tests.stages.test_lm_eval import MC_TASK, independent_mc_accuracy, mc_docs, write_task

    docs = mc_docs(24)
    write_task(tmp_path / "tasks", "next_letter", docs, MC_TASK)
    run, out = trained_run["run"], tmp_path / "prune"
    task = f", score: lm_eval, lm_eval_task: next_letter, lm_eval_task_paths: [{tmp_path / 'tasks'}]"
    assert prune.main(prune_args(run, out, "prune.target_params=0.85", "prune.search=" + (
        SEARCH.replace("top_k: 3", "top_k: 2") % (
            ", tournament_steps: 3, keep_tournament: true" + task)))) == 0
    res = json.loads((out / "search.json").read_text())
    assert res["tournament"]["score"] == "lm-eval next_letter (higher wins)"
    scores = {}
    for cand in res["candidates"]:
        hf = tmp_path / f"c{cand['candidate']}_hf"
        assert export.main(["--config", TINY, f"run.dir={run}",
                            f"export.input={out / 'tournament' / ('c%d' % cand['candidate'])}",
                            f"export.output={hf}"]) == 0
        scores[cand["candidate"]] = independent_mc_accuracy(hf, docs)
        assert cand["tournament_lm_eval"] == pytest.approx(scores[cand["candidate"]], abs=1e-9)
    assert max(scores.values()) > 0.25  # better than chance: a score that can fail
    best = max(res["candidates"], key=lambda x: x["tournament_lm_eval"])
    assert best["winner"] and res["winner"] == best["candidate"]
    from recipes import report  # the report tables the lm-eval column and plots that score
    from recipes.lib import plots

    table = report.search_lines(res)
    assert "| tournament lm-eval |" in table[2] and "ranked by lm-eval next_letter" in table[0]
    plots.plot_search(res, tmp_path / "search.png")
    assert (tmp_path / "search.png").stat().st_size > 0


@pytest.mark.slow
def test_a_sigkilled_tournament_resumes_to_the_same_result(trained_run, tmp_path):
    """prune's tournament killed with SIGKILL while a candidate trains (the process gets no
    chance to clean up) resumes from what was finished, and decides what an uninterrupted run
    decides, with the same losses."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    run = trained_run["run"]
    search = "prune.search=" + SEARCH % ", tournament_steps: 30"
    whole = tmp_path / "whole"
    assert prune.main(prune_args(run, whole, "prune.target_params=0.85", search)) == 0
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "recipes.prune", *prune_args(run, out, "prune.target_params=0.85",
                                                               search)]
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    work = out.with_name(".killed.tmp") / "tournament"
    deadline = time.time() + 300
    while not (work / "c2" / "logs").is_dir() and time.time() < deadline:  # c2 is training
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert (work / "c1" / "result.json").is_file() and not (out / "manifest.json").exists()
    assert subprocess.run(argv, cwd=ROOT, capture_output=True).returncode == 0
    a, b = (json.loads((x / "search.json").read_text()) for x in (whole, out))
    assert a["winner"] == b["winner"]
    for x, y in zip(a["candidates"], b["candidates"]):
        assert x["ss_config"] == y["ss_config"]
        assert x["tournament_kd_loss"] == pytest.approx(y["tournament_kd_loss"], abs=1e-6)


def test_a_candidate_is_a_record_with_flat_json():
    """Candidates travel as records (tournament.Candidate); as JSON (search.json, prepared.json)
    their fields stay flat, and read back equal."""
    from recipes.lib.tournament import Candidate

    c = Candidate(candidate=2, ss_config={"hidden_size": 48}, arch={"hidden_size": 48},
                  params=1234, zero_shot_lm_loss=3.5, modelopt={"params": 1300.0},
                  tournament={"tournament_kd_loss": 0.25, "tournament_s": 1.5}, winner=True)
    d = json.loads(json.dumps(c.to_dict()))
    assert d == {"candidate": 2, "ss_config": {"hidden_size": 48}, "arch": {"hidden_size": 48},
                 "params": 1234, "zero_shot_lm_loss": 3.5, "winner": True,
                 "modelopt_params": 1300.0, "tournament_kd_loss": 0.25, "tournament_s": 1.5}
    assert Candidate.from_dict(d) == c and c.score("kd_loss") == 0.25
