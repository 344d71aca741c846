"""Prune to a budget, the part that runs: ModelOpt's Minitron search on the loaded teacher, each
top-K candidate pruned and written as a checkpoint, and the short-distillation tournament that
picks the winner (the settings and the method: recipes/lib/search.py).

1. `run_search`: ModelOpt's searcher on the importance of prune's one calibration pass; the
   top-K shapes under the constraint, scored zero-shot (held-out LM loss on the prune data's
   valid split, ModelOpt's `score_func`).
2. `prepare_candidates`: each candidate pruned from the teacher with the importance ModelOpt
   saved (no second calibration) and written as a checkpoint.
3. `run_tournament`: each candidate distilled from the teacher for the same steps with the
   distill section's settings and data order (`tournament_config`), then scored on the held-out
   split of the distillation data (KD and LM loss; `score=lm_eval`: an lm-evaluation-harness
   task on the candidate written as an HF folder). The teacher's logits are recorded once and
   replayed to every candidate (recipes/lib/logit_cache.py). `winner` picks the best.
4. `summary`: search.json, which the report draws.

Resumable: prune keeps its work folder; ModelOpt's state (importance, candidates, zero-shot
scores), each candidate's checkpoint and each tournament run (its own resume checkpoints) are
reused, so a killed tournament continues with the candidate it was training. On Slurm the
candidates can run as jobs of their own (`candidate_job`, cluster.tournament_jobs).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from recipes.lib import (checkpoint, config, harness, interop, logit_cache, megatron_data,
                         modelopt_local, runtime, stage)
from recipes.lib import model as M
from recipes.lib import tokens, train, train_config, train_stage
from recipes.lib.arch import Arch, distill_flops_per_token
from recipes.lib.search import (SCORE_NAMES, Budget, SearchConfig, arch_of, hparams_of,
                                cache_plan, candidate_filter, constraint, tournament_steps)
from recipes.lib.train_config import KDConfig
from recipes.lib.errors import BadState, MissingInput, Refusal

modelopt_local.enable()  # before ModelOpt's prune plugin (recipes/lib/modelopt_local.py)
import modelopt.torch.prune as mtp  # noqa: E402
from modelopt.torch.prune.plugins import mcore_minitron as MM  # noqa: E402

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Candidate:
    """One of the search's top-K shapes, and what the tournament measured of it. As JSON
    (search.json, prepared.json) its fields are flat, as they always were."""
    candidate: int
    """Its rank in ModelOpt's search, from 1."""
    ss_config: dict
    """ModelOpt's export config of the shape."""
    arch: dict
    """hidden / FFN / heads / layers of the shape."""
    params: int
    """Parameters, by our count (the real vocabulary)."""
    zero_shot_lm_loss: float
    """The pruned shape's LM loss before any training (ModelOpt's score, negated)."""
    active_params: int | None = None
    """A mixture of experts: the parameters one token runs through (our count)."""
    modelopt: dict = dataclasses.field(default_factory=dict)
    """ModelOpt's own measure of the constraint ({"params": ...}), as `modelopt_<name>`."""
    tournament: dict = dataclasses.field(default_factory=dict)
    """Its tournament run's result.json: tournament_kd_loss, tournament_lm_loss,
    tournament_lm_eval (an lm-eval score), tournament_s, tournament_tokens."""
    winner: bool = False

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items()
             if k not in ("modelopt", "tournament") and (v is not None or k != "active_params")}
        return {**d, **{f"modelopt_{k}": v for k, v in self.modelopt.items()},
                **self.tournament}

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        own = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in own},
                   modelopt={k[9:]: v for k, v in d.items() if k.startswith("modelopt_")},
                   tournament={k: v for k, v in d.items() if k.startswith("tournament_")})

    def score(self, name: str) -> float:
        """A tournament score: kd_loss, lm_loss or lm_eval."""
        return self.tournament[f"tournament_{name}"]


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What the tournament will run, known before any work (`resolve`)."""
    dc: KDConfig
    """Its distillation settings: the distill section's, fitted to its steps, precision=auto
    made concrete, Megatron prefixes imported."""
    configured: KDConfig
    """The same as written (what prune's fingerprint records)."""
    cache: dict | None
    """The teacher-logit cache plan (search.cache_plan), None without one."""


def resolve(cfg: config.Config, source: interop.Source) -> Resolved:
    """Before any work: the tournament's distillation settings, its data and teacher cache, and
    an lm-eval score's task, checked."""
    s: SearchConfig = cfg.prune.search
    if "distill" not in cfg:
        raise Refusal("prune.search.tournament_steps / tournament_tokens need the distill "
                      "section (the tournament distils each candidate with its settings)")
    d = cfg.typed("distill")
    d = dataclasses.replace(d, data=megatron_data.as_folders(
        d.data, cfg.run.dir, source.arch.vocab_size, source.hf_config.get("eos_token_id"),
        "distill.data", cfg.run.force))
    configured = tournament_config(d, tournament_steps(s, d.global_batch_size, d.seq_length))
    dc, _ = train_config.resolve_precision(configured, cfg.run.dir)
    train_stage.check_data(dc, "distill", source.arch.vocab_size)
    if s.score == "lm_eval":
        check_lm_eval(s, dc, source)
    return Resolved(dc, configured, cache_plan(s, dc, source.arch))


def modelopt_mode(s: SearchConfig) -> list:
    return [("mcore_minitron", MM.get_mcore_minitron_config(
        hidden_size_divisor=s.hidden_size_divisor,
        ffn_hidden_size_divisor=s.ffn_hidden_size_divisor,
        num_moe_experts_divisor=s.num_moe_experts_divisor,
        num_layers_divisor=s.num_layers_divisor))]


def run_search(model, teacher: Arch, c: Budget, pp: int, forward_loop, scores_dir: Path,
               heldout: torch.Tensor) -> tuple:
    """ModelOpt's search on `model` (the teacher, loaded) for the PruneConfig `c`: returns (model
    pruned to the zero-shot best, the top-K candidates as dicts, best first by ModelOpt's size
    order)."""
    s: SearchConfig = c.search

    def zero_shot(m) -> float:  # ModelOpt maximises: minus the held-out LM loss
        res = M.forward_loss(m, heldout, teacher.vocab_size, c.micro_batch_size)
        box = [None if res is None else -res[0] / res[1]]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    cons = constraint(c, teacher)
    model, _ = mtp.prune(model, mode=modelopt_mode(s), constraints=cons, dummy_input=None,
                         config={"forward_loop": forward_loop,
                                 "scores_path": str(scores_dir) + "/",
                                 "max_width_pruning": s.max_width_pruning,
                                 "max_depth_pruning": s.max_depth_pruning,
                                 "hparams_to_skip": s.skipped(teacher), "top_k": s.top_k,
                                 "candidate_filter": candidate_filter(teacher, pp),
                                 "score_func": zero_shot})
    state = torch.load(scores_dir / f"rank{dist.get_rank()}.pth", map_location="cpu",
                       weights_only=False)
    found = state["all_candidates_per_constraint"][tuple(cons.items())]
    metric = next(iter(cons))
    out = []
    for rank, m in enumerate(found[:s.top_k], 1):  # ModelOpt's records
        m = m if isinstance(m, dict) else dataclasses.asdict(m)
        arch = arch_of(teacher, m["ss_config"])
        out.append(Candidate(
            candidate=rank, ss_config={k: int(v) for k, v in m["ss_config"].items()},
            arch={k: getattr(arch, k) for k in hparams_of(teacher)},
            params=arch.num_params(),  # ours: the real vocabulary
            active_params=arch.num_active_params() if arch.is_moe else None,
            modelopt={metric: float(m["metrics"][metric])},
            zero_shot_lm_loss=-float(m["score"])))
    log.info("search: %d shapes fit %s; the top %d: %s", len(found), cons, len(out),
             [(o.arch, round(o.zero_shot_lm_loss, 4)) for o in out])
    return model, out


def prune_to(model, ss_config: dict, s: SearchConfig, scores_dir: Path):
    """The teacher `model` pruned to one searched shape, with the importance (and layer ranking)
    ModelOpt saved during the search: no second calibration."""
    model, _ = mtp.prune(model, mode=modelopt_mode(s),
                         constraints={"export_config": dict(ss_config)}, dummy_input=None,
                         config={"forward_loop": None, "scores_path": str(scores_dir) + "/"})
    return model


def prepare_candidates(found: list[Candidate], load_teacher, teacher: Arch, s: SearchConfig,
                       scores_dir: Path, work: Path, dtype: str) -> list[Path]:
    """Each candidate pruned from a freshly loaded teacher (`load_teacher()`) and written as a
    checkpoint at work/candidates/c<i> (kept across restarts: arch.json is its done mark)."""
    folders = []
    for cand in found:
        folder = work / "candidates" / f"c{cand.candidate}"
        if not (folder / "arch.json").is_file():
            m = prune_to(load_teacher(), cand.ss_config, s, scores_dir)
            checkpoint.save_pruned(m, arch_of(teacher, cand.ss_config), folder, dtype)
        folders.append(folder)
    return folders


def tournament_config(distill_cfg: KDConfig, steps: int) -> KDConfig:
    """The distill section's settings for a `steps`-step tournament run (LR schedule, warm-up and
    evaluation fitted to it)."""
    return dataclasses.replace(distill_cfg, train_iters=steps, save_interval=steps,
                               eval_interval=steps, warmup_iters=min(distill_cfg.warmup_iters,
                                                                     max(steps - 1, 0)),
                               keep_checkpoints=False)


def run_tournament(candidates: list[Candidate], folders: list[Path], teacher: interop.Source,
                   dc: KDConfig, work: Path, seed: int, s: SearchConfig, layout: dict,
                   cache: dict | None = None) -> dict | None:
    """Distil each candidate (its checkpoint in `folders[i]`) from `teacher` with the same
    settings and data order; fills in each candidate's tournament scores. A finished
    candidate's result.json is reused; an unfinished one resumes from its checkpoints.
    keep_tournament: also save each distilled candidate as a checkpoint folder of its own
    (work/c<i>: tracker, iter_<steps>/ with run_config.yaml for `layout` {tp, pp, spec} and
    the tokenizer), which `export` reads. `cache` (search.cache_plan): record the teacher's
    logits once (work/teacher_logits) and replay them to every candidate; returns what was
    recorded (logit_cache.record), None when online."""
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
        done = work / f"c{cand.candidate}" / "result.json"
        trained = not done.is_file()  # else finished before (a rerun, or a job of its own)
        if trained:
            _train_candidate(cand, folder, teacher, dc, work, seed, s, layout, recorded)
        result = json.loads(done.read_text())
        cand.tournament = result
        if trained:
            log.info("tournament c%d %s: held-out KD loss %.4f, LM loss %.4f%s (%.0f s)",
                     cand.candidate, cand.arch, result["tournament_kd_loss"],
                     result["tournament_lm_loss"], f", lm-eval "
                     f"{result['tournament_lm_eval']:.4f}" if "tournament_lm_eval" in result
                     else "", result["tournament_s"])
    return recorded


def _train_candidate(cand: Candidate, folder: Path, teacher: interop.Source, dc: KDConfig,
                     work: Path, seed: int, s: SearchConfig, layout: dict,
                     recorded: dict | None) -> None:
    """One candidate's tournament run; its result.json (rank 0, atomically) last."""
    run_dir = work / f"c{cand.candidate}"
    stage.lock_folder(run_dir, f"prune tournament c{cand.candidate}")  # one job per candidate
    t0 = time.time()
    arch = Arch.from_dict(json.loads((folder / "arch.json").read_text()))
    t = (teacher.arch, teacher.weights)
    if recorded:
        t = logit_cache.CachedTeacher(M.transformer_config(
            teacher.arch, train_stage.build_kwargs(dc, dc.teacher_precision)["dtype"]),
            work / "teacher_logits")
    model, make_step, schedule = train_stage.build_distillation(
        dc, (arch, folder / "iter_0000000"), t)
    final = train.train(dc, run_dir, model, make_step,
                        {"stage": f"tournament c{cand.candidate}", "flops_per_token":
                         distill_flops_per_token(teacher.arch, arch, dc.seq_length)}, seed,
                        schedule_kwargs=schedule)
    if s.keep_tournament:
        steps = dc.train_iters
        checkpoint.save(model, interop.iteration_dir(run_dir, steps), steps)
        if runtime.is_rank0():
            interop.write_layout(run_dir, arch, steps,
                                 dtype=train_stage.build_kwargs(dc)["dtype"], **layout)
            # the tokenizer where Megatron-Bridge keeps it, which `export` reads
            checkpoint.write_sidecars(interop.iteration_dir(run_dir, steps), None,
                                      teacher.tokenizer)
    score = lm_eval_score(model, arch, dc, run_dir / "hf", seed, s, teacher.hf_config,
                          teacher.tokenizer) if s.score == "lm_eval" else None
    del model
    if runtime.is_rank0():  # the held-out losses are reported on global rank 0
        result = {"tournament_kd_loss": final["valid_kd_loss"],
                  "tournament_lm_loss": final["valid_lm_loss"],
                  **({"tournament_lm_eval": score} if score is not None else {}),
                  "tournament_s": round(time.time() - t0, 1),
                  "tournament_tokens": dc.train_iters * dc.global_batch_size * dc.seq_length}
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "cache", ignore_errors=True)
        stage.atomic_write_text(run_dir / "result.json", json.dumps(result, indent=1) + "\n")
    runtime.barrier()


def candidate_job(i: int, tmp: Path, teacher: interop.Source, dc: KDConfig, seed: int,
                  s: SearchConfig, layout: dict, cache: dict | None) -> dict:
    """prune.tournament_job=c<i> (a Slurm job of its own): candidate i's tournament run in the
    work folder the `prepare` job left; its result.json is what the final prune job reads."""
    prepared = tmp / "tournament" / "prepared.json"
    if not prepared.is_file():
        raise MissingInput(f"{prepared} is missing: the prune job with "
                           "prune.tournament_job=prepare has not finished")
    cand = next((Candidate.from_dict(x) for x in json.loads(prepared.read_text())
                 if x["candidate"] == i), None)
    if cand is None:  # the search found fewer shapes than top_k
        log.info("the search found fewer than %d candidates: no candidate %d to train", i, i)
        return {}
    with runtime.distributed(layout["tp"], layout["pp"], seed):
        run_tournament([cand], [tmp / "candidates" / f"c{i}"], teacher, dc, tmp / "tournament",
                       seed, s, layout, cache)
    return cand


def check_lm_eval(s: SearchConfig, dc: KDConfig, teacher: interop.Source) -> None:
    """score=lm_eval, before any work: the teacher's tokenizer, the task, the cloze data."""
    if teacher.tokenizer is None:
        raise Refusal("prune.search.score=lm_eval needs the teacher's tokenizer: give "
                      "prune.input_hf_config an HF folder")
    spec = harness.task_specs(None, [s.lm_eval_task])[0]
    harness.check_task(spec["task"], s.lm_eval_task_paths)
    if spec["task"] == harness.CLOZE:
        m = tokens.data_manifest(dc.data[0], teacher.arch.vocab_size, "distill.data")
        if tokens.available_windows(m["tokens"]["test"], dc.seq_length) < 1:
            raise Refusal(f"{dc.data[0]}: the test split is shorter than one window of "
                          f"{dc.seq_length + 1} tokens, which {harness.CLOZE} needs")


def lm_eval_score(model, arch: Arch, dc: KDConfig, folder: Path, seed: int, s: SearchConfig,
                  hf_config: dict, tokenizer: Path) -> float:
    """A tournament-distilled candidate's lm-evaluation-harness score (higher is better): the
    model written as an HF folder at `folder` (checkpoint.write_hf_model), the task
    `s.lm_eval_task` run offline by the harness (recipes/lib/harness.py); the held-out cloze
    task is built from the tournament data's test split. Collective; every rank gets it."""
    with model.hide_teacher_model():  # the student's parameters only
        tensors = M.gather_hf(model, arch, dtype=torch.float32)
    box = [None]
    if runtime.is_rank0():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        checkpoint.write_hf_model(tensors, folder, arch, hf_config, tokenizer, "float32", 2 << 30)
        spec = harness.task_specs(None, [s.lm_eval_task])[0]
        paths = [Path(x) for x in s.lm_eval_task_paths]
        if spec["task"] == harness.CLOZE:
            test = tokens.data_manifest(dc.data[0], arch.vocab_size,
                                        "distill.data")["tokens"]["test"]
            spec = harness.heldout_cloze(dc.data[0], test, dc.seq_length, s.lm_eval_limit or 64,
                                         seed + 2, tokens.load_tokenizer(folder, "prune.input"),
                                         folder / "cloze")
            paths.append(folder / "cloze")
        res = harness.run({"candidate": folder}, [spec], paths, 8, s.lm_eval_limit,
                          "float32", seed)[spec["task"]]
        if "scores" not in res:
            raise BadState(f"prune.search.lm_eval_task {spec['task']!r} cannot run here: "
                           f"{res.get('unavailable')}")
        box = [res["scores"]["candidate"]]
        shutil.rmtree(folder)
    dist.broadcast_object_list(box, src=0)
    return box[0]


def winner(found: list[Candidate], s: SearchConfig, tournament: bool) -> Candidate:
    """The candidate that wins: the best tournament score (lowest loss, highest lm-eval score),
    or the lowest zero-shot loss."""
    if not tournament:
        return min(found, key=lambda x: x.zero_shot_lm_loss)
    sign = -1 if s.score == "lm_eval" else 1
    return min(found, key=lambda x: sign * x.score(s.score))


def summary(c: Budget, teacher: Arch, found: list[Candidate], search_s: float,
            dc: KDConfig | None,
            cached: dict | None = None) -> dict:
    """search.json for the PruneConfig `c`: what was searched, every top-K candidate, the
    winner and the costs."""
    s: SearchConfig = c.search
    winner_ = next(x for x in found if x.winner)
    out = {"constraint": constraint(c, teacher), "teacher_params": teacher.num_params(),
           **({"teacher_active_params": teacher.num_active_params()} if teacher.is_moe else {}),
           "settings": dataclasses.asdict(s), "search_s": round(search_s, 1),
           "decided_by": "tournament" if dc else "zero-shot",
           "winner": winner_.candidate, "candidates": [x.to_dict() for x in found]}
    if dc is not None:
        out["tournament"] = {
            "steps": dc.train_iters, "global_batch_size": dc.global_batch_size,
            "seq_length": dc.seq_length,
            "tokens_per_candidate": dc.train_iters * dc.global_batch_size * dc.seq_length,
            "total_s": round(sum(x.tournament.get("tournament_s", 0) for x in found), 1),
            "teacher": "logits cached once and replayed" if cached else "run online",
            "teacher_cache_mb": cached["mb"] if cached else None,
            "teacher_cache": None if cached is None else {
                k: cached[k] for k in ("encoding", "top_k", "batches", "mb", "tail_mass_mean",
                                       "tail_mass_max")},
            "score": f"lm-eval {s.lm_eval_task} (higher wins)" if s.score == "lm_eval"
            else f"held-out {SCORE_NAMES[s.score]} on the distillation data's valid split "
                 "(lower wins)"}
    return out
