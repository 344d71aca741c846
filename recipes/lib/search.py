"""Prune to a budget (`prune.target_params` / `prune.target_memory_mb`): ModelOpt's Minitron
architecture search, then a short-distillation tournament that picks the winner.

1. Search. ModelOpt's `mcore_minitron` searcher, on the importance the prune stage's one
   calibration pass measured, enumerates the pruned shapes under the constraint (each width
   hparam at most `max_width_pruning`, depth at most `max_depth_pruning` below the teacher, on
   the grid of the `*_divisor` settings), rejects shapes `transformers` could not load or the
   output layout could not hold (`candidate_filter`), ranks them by size and scores the top
   `top_k` zero-shot: held-out LM loss on the prune data's valid split, the candidate pruned in
   place (ModelOpt's `score_func`). Depth is dropped by ModelOpt's layer ranking.
2. Tournament (`tournament_steps` > 0). The Minitron papers: rankings right after pruning differ
   from rankings after light retraining. Each of the top-K is pruned from the teacher (the same
   importance, reused from ModelOpt's saved state, no second calibration), distilled from the
   teacher for `tournament_steps` steps with the distill section's settings and the same data
   order, and scored on the held-out split of the distillation data (KD loss; LM loss recorded).
   The lowest KD loss wins; its pruned (not distilled) checkpoint becomes the stage's output,
   which `distill` then trains in full. Without a tournament ModelOpt's zero-shot best wins.
3. `search.json`: every candidate's shape, parameters, metric, zero-shot and tournament scores
   and times; the report draws it.

Resumable: the stage keeps its work folder; ModelOpt's state (importance, candidates, zero-shot
scores), each candidate's checkpoint and each tournament run (its own resume checkpoints) are
reused, so a killed tournament continues with the candidate it was training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import types
from pathlib import Path

import torch

from recipes.lib import runtime
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
    "tournament_steps": 0,        # 0: ModelOpt's zero-shot ranking decides
    "keep_tournament": False,     # keep each candidate's tournament-distilled checkpoint
    "teacher_cache": True,        # record the teacher's logits once, replay them (TP=PP=1)
}


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
    if int(s["tournament_steps"]) < 0 or int(s["tournament_steps"]) != s["tournament_steps"]:
        raise ValueError(f"prune.search.tournament_steps={s['tournament_steps']} must be a "
                         "whole number >= 0")
    return s


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


def _key(tokens: torch.Tensor) -> str:
    t = tokens.detach().cpu().contiguous()
    return hashlib.sha1(t.numpy().tobytes() + str(tuple(t.shape)).encode()).hexdigest()


class _Replay(torch.nn.Module):
    """Stands where the teacher's output layer was: ModelOpt's hook on it captures the replayed
    logits exactly as megatron's ColumnParallelLinear returns them, (output, bias)."""

    def forward(self, logits):
        return logits, None


class _NoDecoder(torch.nn.Module):
    """What ModelOpt's pipeline hook reaches for on the teacher (GPTModel.set_input_tensor calls
    decoder.set_input_tensor); the replay has no layers to feed."""

    def set_input_tensor(self, tensor):
        pass


class CachedTeacher(torch.nn.Module):
    """The teacher in a tournament run: its output-layer activations for each micro-batch,
    recorded once (`record_teacher`) and replayed by content (a hash of the tokens), so every
    candidate learns from the same numbers without running the teacher again."""

    def __init__(self, config, folder: Path):
        super().__init__()
        self.config, self.folder = config, Path(folder)
        self.output_layer = _Replay()
        self.decoder = _NoDecoder()

    def forward(self, input_ids, position_ids=None, attention_mask=None, *args, **kwargs):
        f = self.folder / f"{_key(input_ids)}.pt"
        if not f.is_file():
            raise KeyError(f"{f}: no cached teacher logits for this batch (the tournament's data "
                           "or settings changed since they were recorded)")
        logits = torch.load(f, map_location=input_ids.device, weights_only=True)
        return self.output_layer(logits)[0].transpose(0, 1)


def record_teacher(teacher: tuple, dc, seed: int, folder: Path) -> dict:
    """The teacher's output-layer activations for every micro-batch a tournament run reads
    (training steps and validation), one file per batch, in the dtype the teacher computes them
    (so replayed KD losses equal online ones). Reused when complete; returns {batches, mb}."""
    from megatron.core import parallel_state as ps

    from recipes.lib import train, train_stage

    done = folder / "complete.json"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        model = train_stage.build_loaded(dc, teacher, dc.teacher_precision)
        model.eval()
        train_ds, valid_ds = train.build_datasets(dc, seed, folder / "data_index")
        n_micro = train.check_layout(dc, ps.get_data_parallel_world_size())
        batches = [b for step in range(dc.train_iters)
                   for b in train.micro_batches(train_ds, step, dc, n_micro)]
        batches += [b for i in range(dc.eval_iters)
                    for b in train.micro_batches(valid_ds, i, dc, n_micro)]
        seen = {}
        hook = model.output_layer.register_forward_hook(
            lambda _m, _i, out: seen.__setitem__("logits", out[0].detach()))
        with torch.no_grad():
            for b in batches:
                f = folder / f"{_key(b['tokens'])}.pt"
                if f.is_file():
                    continue
                b = train.on_device(b, model)
                model(b["tokens"], b["position_ids"], attention_mask=None)
                tmp = f.with_suffix(".tmp")
                torch.save(seen.pop("logits").cpu().clone(), tmp)
                tmp.replace(f)
        hook.remove()
        del model
        size = sum(p.stat().st_size for p in folder.glob("*.pt"))
        runtime.barrier()
        if runtime.is_rank0():
            done.write_text(json.dumps({"batches": len(batches), "mb": round(size / 2**20, 1)})
                            + "\n")
        runtime.barrier()
    return json.loads(done.read_text())


def run_tournament(candidates: list[dict], folders: list[Path], teacher: tuple, dc, work: Path,
                   seed: int, keep: dict | None, cache: bool = False) -> dict | None:
    """Distil each candidate (its checkpoint in `folders[i]`) from `teacher` (arch, weights) with
    the same settings and data order; fills in each candidate's tournament scores. A finished
    candidate's result.json is reused; an unfinished one resumes from its checkpoints. `keep`
    ({tp, pp, spec}): also save each distilled candidate as a checkpoint folder of its own
    (work/c<i>: tracker, iter_<steps>, run_config.yaml), which `export` reads. `cache`: record
    the teacher's logits once (work/teacher_logits) and replay them to every candidate; returns
    the cache's {batches, mb}."""
    from recipes.lib import checkpoint, interop, train, train_stage
    from recipes.lib import model as M

    recorded = None
    if cache:
        recorded = record_teacher(teacher, dc, seed, work / "teacher_logits")
        log.info("tournament: the teacher's logits for %d micro-batches cached once (%.1f MB)",
                 recorded["batches"], recorded["mb"])

    for cand, folder in zip(candidates, folders):
        run_dir = work / f"c{cand['candidate']}"
        done = run_dir / "result.json"
        if done.is_file():
            cand.update(json.loads(done.read_text()))
            continue
        t0 = time.time()
        arch = Arch.from_dict(json.loads((folder / "arch.json").read_text()))
        t = teacher
        if cache:
            t = CachedTeacher(M.transformer_config(teacher[0], train_stage.build_kwargs(
                dc, dc.teacher_precision)["dtype"]), work / "teacher_logits")
        model, make_step = train_stage.build_distillation(
            dc, (arch, folder / "iter_0000000"), t)
        final = train.train(dc, run_dir, model, make_step,
                            {"stage": f"tournament c{cand['candidate']}"}, seed)
        if keep:
            steps = dc.train_iters
            checkpoint.save(model, interop.iteration_dir(run_dir, steps), steps)
            if runtime.is_rank0():
                interop.write_layout(run_dir, arch, steps, dtype=train_stage.build_kwargs(dc)[
                    "dtype"], **keep)
        result = {"tournament_kd_loss": final["valid_kd_loss"],
                  "tournament_lm_loss": final["valid_lm_loss"],
                  "tournament_s": round(time.time() - t0, 1),
                  "tournament_tokens": dc.train_iters * dc.global_batch_size * dc.seq_length}
        del model
        if runtime.is_rank0():
            import shutil

            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            shutil.rmtree(run_dir / "cache", ignore_errors=True)
            (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        runtime.barrier()
        cand.update(result)
        log.info("tournament c%d %s: held-out KD loss %.4f, LM loss %.4f (%.0f s)",
                 cand["candidate"], cand["arch"], result["tournament_kd_loss"],
                 result["tournament_lm_loss"], result["tournament_s"])
    return recorded


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
            "score": "held-out KD loss on the distillation data's valid split (lower wins)"}
    return out
