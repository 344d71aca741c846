"""Prune to a budget (`prune.target_params` / `prune.target_memory_mb`): ModelOpt's Minitron
architecture search, then a short-distillation tournament that picks the winner.

1. Search. ModelOpt's `mcore_minitron` searcher, on the importance the prune stage's one
   calibration pass measured, enumerates the pruned shapes under the constraint (each width
   hparam at most `max_width_pruning`, depth at most `max_depth_pruning` below the teacher, on
   the grid of the `*_divisor` settings), rejects shapes `transformers` could not load or the
   output layout could not hold (`candidate_filter`), ranks them by size and scores the top
   `top_k` zero-shot: held-out LM loss on the prune data's valid split, the candidate pruned in
   place (ModelOpt's `score_func`). Depth is dropped by ModelOpt's layer ranking.
2. Tournament (`tournament_steps`, or `tournament_tokens` rounded up to steps). The Minitron
   papers: rankings right after pruning differ from rankings after light retraining. Each of
   the top-K is pruned from the teacher (the same importance, reused from ModelOpt's saved
   state, no second calibration), distilled from the teacher for the same steps with the
   distill section's settings and the same data order, and scored on the held-out split of
   the distillation data (KD and LM loss; `score` picks which ranks). The teacher's logits are
   recorded once and replayed to every candidate (recipes/lib/logit_cache.py: the full
   vocabulary, or top-K within `teacher_cache_max_gb`). The lowest score wins; its pruned (not
   distilled) checkpoint becomes the stage's output, which `distill` then trains in full.
   Without a tournament ModelOpt's zero-shot best wins.
3. `search.json`: every candidate's shape, parameters, metric, zero-shot and tournament scores
   and times; the report draws it.

Resumable: the stage keeps its work folder; ModelOpt's state (importance, candidates, zero-shot
scores), each candidate's checkpoint and each tournament run (its own resume checkpoints) are
reused, so a killed tournament continues with the candidate it was training.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import types
from pathlib import Path

import torch

from recipes.lib import runtime, stage
from recipes.lib.arch import WIDTH_KEYS, Arch, pruned_arch

log = logging.getLogger("recipes.prune")

HPARAMS = (*WIDTH_KEYS, "num_layers")
DEFAULTS = {
    "hparams": list(HPARAMS),     # what the search may shrink; the others stay the teacher's
    "max_width_pruning": 0.4,     # ModelOpt's defaults
    "max_depth_pruning": 0.2,
    "top_k": 4,
    "hidden_size_divisor": 256,   # the search grid (ModelOpt's defaults; small models need less)
    "ffn_hidden_size_divisor": 512,
    "num_layers_divisor": 2,
    "tournament_steps": 0,        # 0 (and no tournament_tokens): the zero-shot ranking decides
    "tournament_tokens": 0,       # instead of steps: tokens per candidate (rounded up to steps)
    "score": "kd_loss",           # what the tournament ranks by: kd_loss | lm_loss | lm_eval
    "lm_eval_task": None,         # score=lm_eval: a task name or {task, num_fewshot, metric}
    "lm_eval_task_paths": [],     # folders of local task YAMLs (nothing is downloaded)
    "lm_eval_limit": None,        # documents per candidate (None: all)
    "keep_tournament": False,     # keep each candidate's tournament-distilled checkpoint
    "teacher_cache": True,        # record the teacher's logits once, replay them
    "teacher_cache_top_k": None,  # K: top-K logits; None: full vocabulary if it fits, else top-K
    "teacher_cache_max_gb": 16.0,  # the cache's disk budget (recipes/lib/logit_cache.py)
}
SCORE_NAMES = {"kd_loss": "KD loss", "lm_loss": "LM loss", "lm_eval": "lm-eval score"}


def settings(search: dict | None) -> dict:
    """prune.search with the defaults filled in; unknown keys and bad values refused by name."""
    search = dict(search or {})
    unknown = sorted(set(search) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"prune.search has unknown key(s) {unknown}; valid: {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **search}
    bad = sorted(set(s["hparams"]) - set(HPARAMS))
    if bad or not s["hparams"]:
        raise ValueError(f"prune.search.hparams={s['hparams']}: choose among {list(HPARAMS)}")
    for k in ("max_width_pruning", "max_depth_pruning"):
        if not 0 <= float(s[k]) < 1:
            raise ValueError(f"prune.search.{k}={s[k]} must be in [0, 1)")
    for k in ("top_k", "hidden_size_divisor", "ffn_hidden_size_divisor", "num_layers_divisor"):
        if int(s[k]) < 1 or int(s[k]) != s[k]:
            raise ValueError(f"prune.search.{k}={s[k]} must be a whole number >= 1")
    for k in ("keep_tournament", "teacher_cache"):
        if not isinstance(s[k], bool):
            raise ValueError(f"prune.search.{k}={s[k]!r}: use true or false")
    for k in ("tournament_steps", "tournament_tokens"):
        if int(s[k]) < 0 or int(s[k]) != s[k]:
            raise ValueError(f"prune.search.{k}={s[k]} must be a whole number >= 0")
    if s["tournament_steps"] and s["tournament_tokens"]:
        raise ValueError("set prune.search.tournament_steps or tournament_tokens, not both")
    if s["score"] not in SCORE_NAMES:
        raise ValueError(f"prune.search.score={s['score']!r}: use one of {list(SCORE_NAMES)}")
    if (s["score"] == "lm_eval") != (s["lm_eval_task"] is not None):
        raise ValueError("prune.search.score=lm_eval and prune.search.lm_eval_task go together: "
                         "name the task (e.g. heldout_cloze, or a local task with "
                         "lm_eval_task_paths) or score by kd_loss / lm_loss")
    k = s["teacher_cache_top_k"]
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"prune.search.teacher_cache_top_k={k!r}: a whole number >= 1, or null "
                         "(the full vocabulary when the cache fits teacher_cache_max_gb)")
    if not float(s["teacher_cache_max_gb"]) > 0:
        raise ValueError(f"prune.search.teacher_cache_max_gb={s['teacher_cache_max_gb']} must "
                         "be > 0")
    return s


def tournament_steps(s: dict, gbs: int, seq: int) -> int:
    """Steps per candidate: tournament_steps, or tournament_tokens rounded up to whole steps of
    the distill section's global batch (0: no tournament)."""
    return int(s["tournament_steps"]) or -(-int(s["tournament_tokens"]) // (gbs * seq))


def cache_plan(s: dict, dc, teacher: Arch) -> dict | None:
    """The teacher cache the tournament `dc` would use (logit_cache.choose), None when off."""
    from recipes.lib import logit_cache

    if not s["teacher_cache"]:
        return None
    if dc.intermediate_layer_pairs:  # those losses need the teacher's own layers
        return {"encoding": "online", "why": "distill.intermediate_layer_pairs need the "
                "teacher's layers"}
    sequences = (dc.train_iters + dc.eval_iters) * dc.global_batch_size
    dtype = "fp32" if dc.teacher_precision == "fp32" else "bf16"
    return logit_cache.choose(sequences * dc.seq_length, sequences // dc.micro_batch_size,
                              teacher.padded_vocab_size, teacher.vocab_size, dtype,
                              s["teacher_cache_top_k"], float(s["teacher_cache_max_gb"]))


def constraint(c, teacher: Arch) -> dict:
    """ModelOpt's constraint: {'params': n} (a fraction <= 1 of the teacher's, or absolute) or
    {'memory_mb': mb}. ModelOpt counts the padded vocabulary, so the recipe's own count (real
    vocabulary) of a chosen shape is never above the target."""
    if c.target_params is not None:
        n = c.target_params * teacher.num_params() if c.target_params <= 1 else c.target_params
        return {"params": float(n)}
    return {"memory_mb": float(c.target_memory_mb)}


def arch_of(teacher: Arch, ss_config: dict) -> Arch | None:
    """The architecture of a searched shape, or None when it cannot be exported (the checks of
    pruned_arch: heads a multiple of the KV groups, hidden a multiple of heads)."""
    want = {k: ss_config.get(k) for k in HPARAMS}
    c = types.SimpleNamespace(**want, depth_method="block_influence", drop_layers=None)
    try:
        return pruned_arch(teacher, c)[0]
    except ValueError:
        return None


def candidate_filter(teacher: Arch, pp: int):
    def ok(cfg: dict) -> bool:
        a = arch_of(teacher, cfg)
        return a is not None and a.num_layers % pp == 0
    return ok


def grid(teacher: Arch, s: dict, target: dict, pp: int) -> tuple[dict, list[Arch]]:
    """Before any weights (plan): the search space ModelOpt builds for `teacher` (its hparam
    choices on the divisor grid, cut by ModelOpt's own max_*_pruning rule) and the shapes that
    pass the filter and fit a `params` target by our count, largest first. ModelOpt counts the
    padded vocabulary, so near the target its list can differ by a shape."""
    from recipes.lib import compat

    compat.enable_modelopt()  # ModelOpt's megatron plugin on a machine without TE
    from modelopt.torch.prune.plugins.mcore_minitron import MCoreMinitronSearcher

    def multiples(top: int, step: int) -> list[int]:
        return sorted({*range(step, top + 1, step), top})

    choices = {"hidden_size": multiples(teacher.hidden_size, int(s["hidden_size_divisor"])),
               "ffn_hidden_size": multiples(teacher.ffn_hidden_size,
                                            int(s["ffn_hidden_size_divisor"])),
               "num_attention_heads": multiples(teacher.num_attention_heads,
                                                teacher.num_query_groups),
               "num_layers": multiples(teacher.num_layers, int(s["num_layers_divisor"]))}
    skip = [h for h in HPARAMS if h not in s["hparams"]]
    combos = MCoreMinitronSearcher._generate_search_space_combos(
        choices, float(s["max_width_pruning"]), float(s["max_depth_pruning"]), skip or None)
    space = {k: sorted({c[k] for c in combos if k in c}) for k in HPARAMS}
    ok = candidate_filter(teacher, pp)
    fits = [a for c in combos if ok(c) and (a := arch_of(teacher, c)) is not None
            and ("params" not in target or a.num_params() <= target["params"])]
    return space, sorted(fits, key=lambda a: -a.num_params())


def modelopt_mode(s: dict) -> list:
    from modelopt.torch.prune.plugins import mcore_minitron as MM

    return [("mcore_minitron", MM.get_mcore_minitron_config(
        hidden_size_divisor=int(s["hidden_size_divisor"]),
        ffn_hidden_size_divisor=int(s["ffn_hidden_size_divisor"]),
        num_layers_divisor=int(s["num_layers_divisor"])))]


def search(model, teacher: Arch, c, s: dict, pp: int, forward_loop, scores_dir: Path,
           heldout: torch.Tensor) -> tuple:
    """ModelOpt's search on `model` (the teacher, loaded): returns (model pruned to the zero-shot
    best, the top-K candidates as dicts, best first by ModelOpt's size order)."""
    import modelopt.torch.prune as mtp

    from recipes.lib import model as M

    def zero_shot(m) -> float:  # ModelOpt maximises: minus the held-out LM loss
        res = M.forward_loss(m, heldout, teacher.vocab_size, c.micro_batch_size)
        box = [None if res is None else -res[0] / res[1]]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    cons = constraint(c, teacher)
    skip = [h for h in HPARAMS if h not in s["hparams"]]
    model, _ = mtp.prune(model, mode=modelopt_mode(s), constraints=cons, dummy_input=None,
                         config={"forward_loop": forward_loop,
                                 "scores_path": str(scores_dir) + "/",
                                 "max_width_pruning": float(s["max_width_pruning"]),
                                 "max_depth_pruning": float(s["max_depth_pruning"]),
                                 "hparams_to_skip": skip or None, "top_k": int(s["top_k"]),
                                 "candidate_filter": candidate_filter(teacher, pp),
                                 "score_func": zero_shot})
    state = torch.load(scores_dir / f"rank{torch.distributed.get_rank()}.pth",
                       map_location="cpu", weights_only=False)
    found = state["all_candidates_per_constraint"][tuple(cons.items())]
    metric = next(iter(cons))
    out = []
    for rank, cand in enumerate(found[:int(s["top_k"])], 1):
        cand = cand if isinstance(cand, dict) else dataclasses.asdict(cand)
        arch = arch_of(teacher, cand["ss_config"])
        out.append({"candidate": rank, "ss_config": {k: int(v) for k, v in
                                                     cand["ss_config"].items()},
                    "arch": {k: getattr(arch, k) for k in HPARAMS},
                    "params": arch.num_params(),  # ours: the real vocabulary
                    f"modelopt_{metric}": float(cand["metrics"][metric]),
                    "zero_shot_lm_loss": -float(cand["score"])})
    log.info("search: %d shapes fit %s; the top %d: %s", len(found), cons, len(out),
             [(o["arch"], round(o["zero_shot_lm_loss"], 4)) for o in out])
    return model, out


def prune_to(model, ss_config: dict, s: dict, scores_dir: Path):
    """The teacher `model` pruned to one searched shape, with the importance (and layer ranking)
    ModelOpt saved during the search: no second calibration."""
    import modelopt.torch.prune as mtp

    model, _ = mtp.prune(model, mode=modelopt_mode(s),
                         constraints={"export_config": dict(ss_config)}, dummy_input=None,
                         config={"forward_loop": None, "scores_path": str(scores_dir) + "/"})
    return model


def tournament_config(distill_cfg, steps: int):
    """The distill section's settings for a `steps`-step tournament run (LR schedule, warm-up and
    evaluation fitted to it)."""
    return dataclasses.replace(distill_cfg, train_iters=steps, save_interval=steps,
                               eval_interval=steps, warmup_iters=min(distill_cfg.warmup_iters,
                                                                     max(steps - 1, 0)),
                               keep_checkpoints=False, fault=None)


def run_tournament(candidates: list[dict], folders: list[Path], teacher, dc, work: Path,
                   seed: int, s: dict, layout: dict, cache: dict | None = None) -> dict | None:
    """Distil each candidate (its checkpoint in `folders[i]`) from `teacher` (an interop.Source:
    architecture, weights, HF config, tokenizer) with the same settings and data order; fills
    in each candidate's tournament scores. A finished candidate's result.json is reused; an
    unfinished one resumes from its checkpoints. `s`: the search settings. keep_tournament: also
    save each distilled candidate as a checkpoint folder of its own (work/c<i>: tracker,
    iter_<steps>/ with run_config.yaml for `layout` {tp, pp, spec} and the tokenizer), which
    `export` reads. score=lm_eval: score each distilled candidate with
    lm-evaluation-harness (`lm_eval_score`). `cache` (`cache_plan`): record the teacher's logits
    once (work/teacher_logits) and replay them to every candidate; returns what was recorded
    (logit_cache.record), None when online."""
    from recipes.lib import checkpoint, interop, logit_cache, train, train_stage
    from recipes.lib import model as M

    recorded = None
    if cache and cache["encoding"] != "online":
        recorded = logit_cache.record((teacher.arch, teacher.weights), dc, seed,
                                      work / "teacher_logits", cache["top_k"])
        log.info("tournament: the teacher's logits for %d micro-batches cached once (%.1f MB, "
                 "%s)", recorded["batches"], recorded["mb"], "the full vocabulary"
                 if cache["top_k"] is None else f"the top {cache['top_k']}, mean tail mass "
                 f"{recorded['tail_mass_mean']:.4f}; the full vocabulary: {cache['full_mb']} MB")
    elif cache:
        log.info("tournament: the teacher runs online for each candidate (%s)", cache["why"])

    for cand, folder in zip(candidates, folders):
        run_dir = work / f"c{cand['candidate']}"
        done = run_dir / "result.json"
        if done.is_file():
            cand.update(json.loads(done.read_text()))
            continue
        stage.lock(run_dir, f"prune tournament c{cand['candidate']}")  # one job per candidate
        t0 = time.time()
        arch = Arch.from_dict(json.loads((folder / "arch.json").read_text()))
        t = (teacher.arch, teacher.weights)
        if recorded:
            t = logit_cache.CachedTeacher(M.transformer_config(
                teacher.arch, train_stage.build_kwargs(dc, dc.teacher_precision)["dtype"]),
                work / "teacher_logits")
        model, make_step = train_stage.build_distillation(
            dc, (arch, folder / "iter_0000000"), t)
        final = train.train(dc, run_dir, model, make_step,
                            {"stage": f"tournament c{cand['candidate']}"}, seed)
        if s["keep_tournament"]:
            steps = dc.train_iters
            checkpoint.save(model, interop.iteration_dir(run_dir, steps), steps)
            if runtime.is_rank0():
                interop.write_layout(run_dir, arch, steps, dtype=train_stage.build_kwargs(dc)[
                    "dtype"], **layout)
                # the tokenizer where Megatron-Bridge keeps it, which `export` reads
                checkpoint.write_sidecars(interop.iteration_dir(run_dir, steps), None,
                                          teacher.tokenizer)
        lm_eval = s["score"] == "lm_eval"
        score = lm_eval_score(model, arch, dc, run_dir / "hf", seed, s, teacher.hf_config,
                              teacher.tokenizer) if lm_eval else None
        del model
        if runtime.is_rank0():  # the held-out losses are reported on global rank 0
            import shutil

            result = {"tournament_kd_loss": final["valid_kd_loss"],
                      "tournament_lm_loss": final["valid_lm_loss"],
                      **({"tournament_lm_eval": score} if lm_eval else {}),
                      "tournament_s": round(time.time() - t0, 1),
                      "tournament_tokens": dc.train_iters * dc.global_batch_size *
                      dc.seq_length}
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            shutil.rmtree(run_dir / "cache", ignore_errors=True)
            stage.atomic_write_text(done, json.dumps(result, indent=1) + "\n")
        runtime.barrier()
        result = json.loads(done.read_text())
        cand.update(result)
        log.info("tournament c%d %s: held-out KD loss %.4f, LM loss %.4f%s (%.0f s)",
                 cand["candidate"], cand["arch"], result["tournament_kd_loss"],
                 result["tournament_lm_loss"], f", lm-eval {result['tournament_lm_eval']:.4f}"
                 if lm_eval else "", result["tournament_s"])
    return recorded


def check_lm_eval(s: dict, dc, teacher) -> None:
    """score=lm_eval, before any work: the teacher's tokenizer, the task, the cloze data."""
    from recipes.lib import harness, tokens

    if teacher.tokenizer is None:
        raise ValueError("prune.search.score=lm_eval needs the teacher's tokenizer: give "
                         "prune.input_hf_config an HF folder")
    spec = harness.task_specs(None, [s["lm_eval_task"]])[0]
    harness.check_task(spec["task"], s["lm_eval_task_paths"])
    if spec["task"] == harness.CLOZE:
        m = tokens.data_manifest(dc.data[0], teacher.arch.vocab_size, "distill.data")
        if tokens.available_windows(m["tokens"]["test"], dc.seq_length) < 1:
            raise ValueError(f"{dc.data[0]}: the test split is shorter than one window of "
                             f"{dc.seq_length + 1} tokens, which {harness.CLOZE} needs")


def lm_eval_score(model, arch: Arch, dc, folder: Path, seed: int, settings: dict,
                  hf_config: dict, tokenizer: Path) -> float:
    """A tournament-distilled candidate's lm-evaluation-harness score (higher is better): the
    model written as an HF folder at `folder` (recipes/lib/checkpoint.write_hf_model), the task
    `settings['lm_eval_task']` run offline by the harness (recipes/lib/harness.py); the held-out
    cloze task is built from the tournament data's test split. Collective; every rank gets it."""
    from recipes.lib import checkpoint, harness, tokens
    from recipes.lib import model as M

    with model.hide_teacher_model():  # the student's parameters only
        tensors = M.gather_hf(model, arch, dtype=torch.float32)
    box = [None]
    if runtime.is_rank0():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        checkpoint.write_hf_model(tensors, folder, arch, hf_config, tokenizer, "float32", 2 << 30)
        spec = harness.task_specs(None, [settings["lm_eval_task"]])[0]
        paths = [Path(x) for x in settings["lm_eval_task_paths"]]
        if spec["task"] == harness.CLOZE:
            from transformers import AutoTokenizer

            test = tokens.data_manifest(dc.data[0], arch.vocab_size,
                                        "distill.data")["tokens"]["test"]
            spec = harness.heldout_cloze(dc.data[0], test, dc.seq_length,
                                         settings["lm_eval_limit"] or 64, seed + 2,
                                         AutoTokenizer.from_pretrained(folder), folder / "cloze")
            paths.append(folder / "cloze")
        res = harness.run({"candidate": folder}, [spec], paths, 8, settings["lm_eval_limit"],
                          "float32", seed)[spec["task"]]
        if "scores" not in res:
            raise RuntimeError(f"prune.search.lm_eval_task {spec['task']!r} cannot run here: "
                               f"{res.get('unavailable')}")
        box = [res["scores"]["candidate"]]
        shutil.rmtree(folder)
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def summary(c, teacher: Arch, s: dict, found: list[dict], search_s: float, dc,
            cached: dict | None = None) -> dict:
    """search.json: what was searched, every top-K candidate, the winner and the costs."""
    winner = next(x for x in found if x["winner"])
    out = {"constraint": constraint(c, teacher), "teacher_params": teacher.num_params(),
           "settings": s, "search_s": round(search_s, 1),
           "decided_by": "tournament" if dc else "zero-shot",
           "winner": winner["candidate"], "candidates": found}
    if dc is not None:
        out["tournament"] = {
            "steps": dc.train_iters, "global_batch_size": dc.global_batch_size,
            "seq_length": dc.seq_length,
            "tokens_per_candidate": dc.train_iters * dc.global_batch_size * dc.seq_length,
            "total_s": round(sum(x.get("tournament_s", 0) for x in found), 1),
            "teacher": "logits cached once and replayed" if cached else "run online",
            "teacher_cache_mb": cached["mb"] if cached else None,
            "teacher_cache": None if cached is None else {
                k: cached[k] for k in ("encoding", "top_k", "batches", "mb", "tail_mass_mean",
                                       "tail_mass_max")},
            "score": f"lm-eval {s['lm_eval_task']} (higher wins)" if s["score"] == "lm_eval"
            else f"held-out {SCORE_NAMES[s['score']]} on the distillation data's valid split "
                 "(lower wins)"}
    return out


def winner(found: list[dict], s: dict, tournament: bool) -> dict:
    """The candidate that wins: the best tournament score (lowest loss, highest lm-eval score),
    or the lowest zero-shot loss."""
    if not tournament:
        return min(found, key=lambda x: x["zero_shot_lm_loss"])
    sign = -1 if s["score"] == "lm_eval" else 1
    return min(found, key=lambda x: sign * x[f"tournament_{s['score']}"])
