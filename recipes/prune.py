"""Stage `prune`: Minitron structured pruning of the converted teacher with ModelOpt.

    python -m recipes.prune --config conf/llama31_8b_to_4b_width.yaml run.dir=runs/w
    torchrun --nproc-per-node 2 -m recipes.prune --config ... parallel.pp=2

Importance comes from forward passes over `calib_samples` windows of the data stage's train
split (ModelOpt `mcore_minitron`: heads from the attention output, neurons from the input of
linear_fc2, embedding channels from the layernorm outputs). Width targets (hidden_size,
ffn_hidden_size, num_attention_heads) go to `mtp.prune` as its export_config. Depth
(num_layers) has three methods:
  drop_layers      an explicit list, 1-indexed as in the paper (16..31 = HF layers 15..30);
  contiguous       the paper's: the contiguous block whose removal raises the teacher's held-out
                   LM loss least (all candidates are evaluated and tabled);
  block_influence  ModelOpt's own ranking (1 - cosine(input, output) per layer).
Instead of sizes, a budget (`target_params` / `target_memory_mb`): ModelOpt's search and a
short-distillation tournament choose the shape (recipes/lib/search.py, tournament.py). TP must
be 1 (ModelOpt's requirement); PP may be anything. `run`'s phases: `resolve` (every check,
before any weights), then `prune_searched` or `prune_fixed`, then `publish`.
Output: <run.dir>/prune/{iter_0000000/, latest_checkpointed_iteration.txt, importance.json,
importance.pt, manifest.json, ...}: also a Megatron-Bridge / Megatron-LM checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from recipes.lib import (checkpoint, config, disk, importance, interop, megatron_data, runtime,
                         stage, tokens, train_config)
from recipes.lib.arch import Arch, human
from recipes.lib.layout import validate_layout
from recipes.lib.targets import DEPTH_METHODS, budget, pruned_arch, width_keys
from recipes.lib.search import SearchConfig, arch_of, check_target, constraint
from recipes.lib.stage import StageDir, fingerprint, read_manifest
from recipes.lib.errors import Refusal

log = logging.getLogger("recipes.prune")
OPERATIONAL = ("tournament_job",)  # how the work is split into jobs, not what it computes


@dataclasses.dataclass(kw_only=True)
class PruneConfig(config.ModelInput):
    """`input` is the teacher (a convert or teacher_correction stage folder, or a Bridge /
    Megatron-LM checkpoint)."""
    data: str
    """The data stage folder (calibration from train, depth candidates from valid), or a Megatron
    dataset prefix (imported on first use, recipes/lib/megatron_data.py)."""
    hidden_size: int | None = None
    """Target embedding channels (None: keep)."""
    ffn_hidden_size: int | None = None
    """Target MLP neurons (None: keep)."""
    num_attention_heads: int | None = None
    """Target query heads, a multiple of the KV groups (None: keep)."""
    num_layers: int | None = None
    """Target layers (None: keep, or teacher layers minus len(drop_layers))."""
    num_moe_experts: int | None = None
    """A mixture of experts: target experts per layer, the least important by ModelOpt dropped."""
    moe_ffn_hidden_size: int | None = None
    """A mixture of experts: target neurons of each expert's FFN (None: keep)."""
    target_params: float | None = None
    """Instead of the sizes above: a parameter budget, absolute (4.5e9) or a fraction of the
    teacher's (0.55); ModelOpt's search finds the shapes (recipes/lib/search.py)."""
    target_active_params: float | None = None
    """Instead of sizes, for a mixture of experts: active parameters, absolute or a fraction."""
    target_memory_mb: float | None = None
    """Instead of the sizes above: a memory budget in MB (ModelOpt's estimate: bf16 weights + the
    KV cache of one 4096-token sequence)."""
    search: SearchConfig | None = None
    """The search and its tournament (recipes/lib/search.py SearchConfig); with a target."""
    tournament_job: str | None = None
    """Set by the Slurm launcher (cluster.tournament_jobs): `prepare` = the search, candidates
    and teacher cache, then stop; `c<i>` = candidate i's tournament run only, beside the other
    candidates' jobs; unset = what is left, then the winner and the output."""
    depth_method: str = "contiguous"
    """drop_layers | contiguous | block_influence."""
    drop_layers: list | None = None
    """1-indexed layers to drop (depth_method=drop_layers)."""
    calib_samples: int = 1024
    """Calibration windows (the paper: 1024)."""
    seq_length: int = 4096
    """Tokens per calibration / held-out window."""
    micro_batch_size: int = 1
    """Windows per forward pass."""
    depth_eval_samples: int = 64
    """Held-out (valid split) windows per contiguous-block candidate."""
    dtype: str = "bf16"
    """Compute and checkpoint dtype: fp32 | bf16."""
    spec: str = "auto"
    """Layer spec of the model the importance is measured on: auto (TE when present) | local |
    te (recipes/lib/modelopt_local.py teaches ModelOpt the local spec)."""

    @property
    def searching(self) -> bool:
        return budget(self) is not None

    @property
    def tournament(self) -> bool:
        return self.searching and self.search.tournament

    def __post_init__(self):
        if self.depth_method not in DEPTH_METHODS:
            raise Refusal(f"prune.depth_method={self.depth_method!r}; use one of {DEPTH_METHODS}")
        if self.dtype not in ("fp32", "bf16"):
            raise Refusal(f"prune.dtype={self.dtype!r}; use fp32 or bf16")
        if self.drop_layers is not None and self.depth_method != "drop_layers":
            raise Refusal("prune.drop_layers is set but prune.depth_method="
                          f"{self.depth_method}; set prune.depth_method=drop_layers")
        for k in ("calib_samples", "seq_length", "micro_batch_size", "depth_eval_samples"):
            if getattr(self, k) < 1:
                raise Refusal(f"prune.{k} must be >= 1")
        if self.searching:
            self.search = self.search or SearchConfig()
        elif self.search:
            raise Refusal("prune.search is set but no prune.target_params / "
                          "target_active_params / target_memory_mb")
        if self.tournament_job is not None:
            if not self.tournament:
                raise Refusal(f"prune.tournament_job={self.tournament_job!r} but prune runs no "
                              "tournament (prune.target_* with prune.search.tournament_steps "
                              "or tournament_tokens)")
            if not re.fullmatch(r"prepare|c[1-9]\d*", str(self.tournament_job)):
                raise Refusal(f"prune.tournament_job={self.tournament_job!r}: prepare or c<i> "
                              "(the launcher sets it; leave it unset to run the whole stage)")
        if self.calib_samples % self.micro_batch_size:
            raise Refusal(f"prune.calib_samples={self.calib_samples} is not a multiple of "
                          f"prune.micro_batch_size={self.micro_batch_size}")


@dataclasses.dataclass
class Plan:
    """What `resolve` decided, before any weights are read."""
    source: interop.Source
    sdir: StageDir
    resumable: dict
    layout: dict                         # of every checkpoint this stage writes: tp, pp, spec
    student: Arch | None = None          # None: the search finds it
    drop: list | None = None             # 1-indexed layers to drop, where known in advance
    dc: train_config.KDConfig | None = None     # the tournament's distillation settings
    cache: dict | None = None            # the tournament's teacher-logit cache


@dataclasses.dataclass
class Pruned:
    """What a pruning phase produced (in the work folder)."""
    student: Arch
    drop: list | None
    method: str | None                   # how the dropped layers were chosen
    table: list | None = None            # contiguous: every candidate block's held-out loss
    found: list | None = None            # search: the top-K candidates
    search_s: float = 0.0
    cached: dict | None = None           # the tournament's teacher cache
    winner_dir: Path | None = None       # the tournament's winner, already written
    prepared: bool = False               # tournament_job=prepare: candidates ready, no winner


def check_data(c: PruneConfig, data_manifest: dict, need_valid: bool) -> None:
    for split, n in (("train", c.calib_samples), ("valid", c.depth_eval_samples if need_valid
                                                   else 0)):
        avail = tokens.available_windows(data_manifest["tokens"][split], c.seq_length)
        if n > avail:
            raise Refusal(f"prune needs {n} windows of {c.seq_length + 1} tokens from the "
                          f"{split} split, which has {data_manifest['tokens'][split]} tokens "
                          f"({avail} windows); lower prune.calib_samples / "
                          "prune.depth_eval_samples / prune.seq_length or add data")


def resolve(cfg: config.Config) -> Plan:
    """Every check and decision that needs no weights: the teacher, the data, the layout, the
    target (fixed sizes, or the search and its tournament) and the stage folder."""
    c: PruneConfig = cfg.prune
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if tp != 1:
        raise Refusal(f"parallel.tp={tp}: ModelOpt Minitron pruning requires TP=1; prune with "
                      "parallel.tp=1 parallel.pp=N, then distill at any TP/PP")
    if cfg.parallel.ep != 1:
        raise Refusal(f"parallel.ep={cfg.parallel.ep}: prune ranks every expert on each rank; "
                      "prune with parallel.ep=1, then distill at any EP")
    source = interop.open_source(c.input, "prune.input", ("convert", "teacher_correction"),
                                 c.input_hf_config)
    teacher = source.arch
    c.data, = megatron_data.as_folders([c.data], cfg.run.dir, teacher.vocab_size,  # a prefix:
                                       source.hf_config.get("eos_token_id"), "prune.data",
                                       cfg.run.force)
    data_manifest = tokens.data_manifest(c.data, teacher.vocab_size, "prune.data")
    validate_layout(teacher, tp, pp)
    teacher.check_seq_length(c.seq_length, "prune.seq_length")
    layout = {"tp": tp, "pp": pp, "spec": runtime.resolve_spec(c.spec)}  # spec=te without TE
    student = drop = tour = None
    if c.searching:  # the architecture is what the search finds
        c.search.hparams = c.search.chosen(teacher)  # the default: the teacher's own axes
        check_target(c, teacher, pp)  # a budget the grid cannot meet fails here, not in ModelOpt
        check_data(c, data_manifest, need_valid=True)  # zero-shot scores on the valid split
        if c.tournament:
            from recipes.lib import tournament  # lazy: megatron and ModelOpt (see `run`)

            tour = tournament.resolve(cfg, source)
    else:
        student, drop = pruned_arch(teacher, c)
        check_data(c, data_manifest, need_valid=student.num_layers < teacher.num_layers
                   and c.depth_method == "contiguous")
        if student.num_layers % pp:
            raise Refusal(f"the pruned model's {student.num_layers} layers do not divide into "
                          f"parallel.pp={pp} stages; choose a PP that divides both layer "
                          "counts")
    extra = {"pp": pp, "seed": cfg.run.seed}
    inputs = {"input": source.input(), "data": c.data}
    if tour is not None:  # the tournament's settings and data decide its result too (not the
        # distill stage's own input, teacher or output: the tournament's are prune's)
        extra["tournament"] = {k: v for k, v in dataclasses.asdict(tour.configured).items()
                               if k not in {"input", "input_hf_config", "teacher",
                                            "teacher_hf_config", *train_config.OPERATIONAL}}
        inputs.update({f"distill.data.{i}": d for i, d in enumerate(tour.dc.data)})
    sdir = StageDir("prune", Path(c.output or Path(cfg.run.dir) / "prune"),
                    fingerprint(c, extra, ignore=OPERATIONAL), cfg.run.force, inputs=inputs)
    resumable = {**{k: v for k, v in dataclasses.asdict(c).items() if k not in OPERATIONAL},
                 **extra}
    if tour is not None and tour.dc.precision != extra["tournament"]["precision"]:
        resumable["precision_auto"] = tour.dc.precision  # a resume may not switch it
    return Plan(source, sdir, resumable, layout, student, drop, tour and tour.dc,
                tour and tour.cache)


def run(cfg: config.Config) -> dict:
    """Resolve, prune (searched or fixed) in the process groups, publish. megatron and
    ModelOpt (recipes/lib/model.py, tournament.py) are imported inside the phases that need
    them: every stage's config check imports this module."""
    c: PruneConfig = cfg.prune
    plan = resolve(cfg)
    if c.tournament_job not in (None, "prepare"):  # one candidate, as a job of its own
        if plan.sdir.already_done(lock=False):
            return read_manifest(plan.sdir.out)
        from recipes.lib import tournament  # lazy: megatron and ModelOpt

        return tournament.candidate_job(int(c.tournament_job[1:]), plan.sdir.join(plan.resumable),
                                        plan.source, plan.dc, cfg.run.seed, c.search,
                                        plan.layout, plan.cache)
    if plan.sdir.already_done():
        log.info("%s is complete (same config): skipping", plan.sdir.out)
        return read_manifest(plan.sdir.out)
    teacher = plan.source.arch
    if c.searching:
        log.info("prune %s: %s, search within %s", plan.source.path, constraint(c, teacher),
                 {k: getattr(c.search, k) for k in ("hparams", "max_width_pruning",
                                                   "max_depth_pruning", "top_k",
                                                   "tournament_steps")})
    else:
        keys = (*width_keys(teacher), "num_layers")
        log.info("prune %s: %s -> %s (%s -> %s parameters)", plan.source.path,
                 {k: getattr(teacher, k) for k in keys},
                 {k: getattr(plan.student, k) for k in keys},
                 human(teacher.num_params()), human(plan.student.num_params()))
    with runtime.distributed(plan.layout["tp"], plan.layout["pp"], cfg.run.seed):
        # a tournament is long: its work folder survives a kill and the rerun continues
        tmp = plan.sdir.begin(resumable=plan.resumable if plan.dc else None, need=nbytes(c, plan))
        pruned = (prune_searched if c.searching else prune_fixed)(c, plan, tmp, cfg.run.seed)
        if pruned.prepared:  # tournament_job=prepare: the candidates run as jobs of their own
            return {"prepared": [x.candidate for x in pruned.found]}
        return publish(cfg, plan, pruned, tmp)


def nbytes(c: PruneConfig, plan: Plan) -> int:
    """The most prune holds on disk at once: the pruned checkpoint and its HF staging copy; with
    a tournament every candidate's checkpoint, one's training checkpoint and the teacher cache
    (a searched shape is at most the target's share of the teacher)."""
    if plan.student is not None:
        return 2 * disk.nbytes(plan.student, c.dtype)
    t = plan.source.arch
    share = min(1.0, constraint(c, t).get("params", t.num_params()) / t.num_params())
    if plan.dc is None:
        return int(2 * share * disk.nbytes(t, c.dtype))
    train_dtype = "fp32" if plan.dc.precision == "fp32" else "bf16"
    return int(share * ((c.search.top_k + 2) * disk.nbytes(t, c.dtype)
                        + disk.training_nbytes(t, train_dtype))
               + (plan.cache or {}).get("mb", 0) * 2**20)


def load_teacher(c: PruneConfig, plan: Plan):
    """The teacher, built and loaded in the process groups."""
    from recipes.lib import model as M  # lazy: megatron (see `run`)

    m = M.build(plan.source.arch, dtype=c.dtype, spec=c.spec, init=False)
    checkpoint.load(m, plan.source.weights, plan.source.arch.vocab_size)
    return m


def calibration(c: PruneConfig, plan: Plan, seed: int):
    """ModelOpt's `forward_loop`: the calibration windows through the model, with progress."""
    from recipes.lib import model as M  # lazy: megatron (see `run`)

    calib = tokens.windows(c.data, "train", c.seq_length, c.calib_samples, seed)
    vocab = plan.source.arch.vocab_size

    def forward_loop(model):
        step = c.micro_batch_size * 8
        with tqdm(total=c.calib_samples, desc="calibration", unit="seq",
                  disable=not runtime.is_rank0()) as bar:
            for i in range(0, c.calib_samples, step):
                M.forward_loss(model, calib[i: i + step], vocab, c.micro_batch_size)
                bar.update(min(step, c.calib_samples - i))

    return forward_loop


def prune_searched(c: PruneConfig, plan: Plan, tmp: Path, seed: int) -> Pruned:
    """ModelOpt's search, then (with a tournament) each candidate written and distilled
    briefly; the winner. The tournament's `prepare` job stops once the candidates are ready."""
    from recipes.lib import tournament  # lazy: megatron and ModelOpt (see `run`)

    teacher, t0 = plan.source.arch, time.time()
    model = load_teacher(c, plan)
    heldout = tokens.windows(c.data, "valid", c.seq_length, c.depth_eval_samples, seed + 1)
    model, found = tournament.run_search(model, teacher, c, plan.layout["pp"],
                                         calibration(c, plan, seed), tmp / "scores", heldout)
    search_s, cached, winner_dir = time.time() - t0, None, None
    if plan.dc is not None:  # (ModelOpt's note about a manual KD step before ranking: this is it)
        log.info("tournament: %d candidates x %d steps of distillation from the teacher",
                 len(found), plan.dc.train_iters)
        model = None  # the teacher's memory, freed before the candidates are built
        folders = tournament.prepare_candidates(
            found, lambda: load_teacher(c, plan), teacher, c.search, tmp / "scores", tmp, c.dtype)
        if c.tournament_job == "prepare":
            tournament.run_tournament([], [], plan.source, plan.dc, tmp / "tournament", seed,
                                      c.search, plan.layout, plan.cache)  # the teacher cache
            prepared = json.dumps([x.to_dict() for x in found])
            runtime.on_rank0(lambda: stage.atomic_write_text(
                tmp / "tournament" / "prepared.json", prepared))
            log.info("prepared %d tournament candidates in %s", len(found), tmp)
            return Pruned(None, None, None, found=found, prepared=True)
        cached = tournament.run_tournament(found, folders, plan.source, plan.dc,
                                           tmp / "tournament", seed, c.search, plan.layout,
                                           plan.cache)
    best = tournament.winner(found, c.search, plan.dc is not None)
    for cand in found:
        cand.winner = cand is best
    student = arch_of(teacher, best.ss_config)
    log.info("search: %s wins (%s)", best.arch, "tournament" if plan.dc else "zero-shot")
    if plan.dc is not None:
        winner_dir = tmp / "candidates" / f"c{best.candidate}"
    else:
        checkpoint.save_pruned(model, student, tmp, c.dtype)
    drop = importance.modelopt_dropped(importance.scores_file(tmp), student.num_layers) \
        if student.num_layers < teacher.num_layers else None
    return Pruned(student, drop, "modelopt search" if drop else None, found=found,
                  search_s=search_s, cached=cached, winner_dir=winner_dir)


def prune_fixed(c: PruneConfig, plan: Plan, tmp: Path, seed: int) -> Pruned:
    """The sizes the config names: the contiguous block chosen on held-out data (or the listed
    layers, or ModelOpt's ranking), then ModelOpt's width pruning to the export config."""
    from recipes.lib import modelopt_local  # lazy: megatron and ModelOpt (see `run`)

    modelopt_local.enable()
    # lazy: ModelOpt's prune plugin, importable after modelopt_local.enable()
    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.plugins import mcore_minitron as MM

    teacher, student, drop, table = plan.source.arch, plan.student, plan.drop, None
    model = load_teacher(c, plan)
    n_drop = teacher.num_layers - student.num_layers
    if n_drop and c.depth_method == "contiguous":
        heldout = tokens.windows(c.data, "valid", c.seq_length, c.depth_eval_samples, seed + 1)
        table = importance.contiguous_candidates(model, teacher, n_drop, heldout,
                                                 c.micro_batch_size)
        box = [table]
        torch.distributed.broadcast_object_list(box, src=0)
        table = box[0]
        best = min(table, key=lambda r: r["loss"])
        drop = list(range(best["drop_layers"][0], best["drop_layers"][1] + 1))
        log.info("contiguous: least harmful block %s (held-out loss %.4f)",
                 best["drop_layers"], best["loss"])
    export_config = {k: getattr(student, k) for k in width_keys(teacher)}
    if n_drop and c.depth_method == "block_influence":
        export_config["num_layers"] = student.num_layers
    mode = [("mcore_minitron", MM.get_mcore_minitron_config(
        hidden_size_divisor=1, ffn_hidden_size_divisor=1, num_moe_experts_divisor=1,
        num_layers_divisor=1))]
    model, _ = mtp.prune(model, mode=mode, constraints={"export_config": export_config},
                         dummy_input=None, config={"forward_loop": calibration(c, plan, seed),
                                                   "scores_path": str(tmp / "scores") + "/"})
    if drop:
        MM.drop_mcore_language_model_layers(model, layers_to_drop=drop)
    elif n_drop:  # block_influence
        drop = importance.modelopt_dropped(importance.scores_file(tmp), student.num_layers)
    checkpoint.save_pruned(model, student, tmp, c.dtype)
    return Pruned(student, drop, c.depth_method if n_drop else None, table=table)


def publish(cfg: config.Config, plan: Plan, pruned: Pruned, tmp: Path) -> dict:
    """The pruned checkpoint with its layout files, sidecars, importance and search records,
    then the commit (manifest last)."""
    c: PruneConfig = cfg.prune
    teacher, student, drop = plan.source.arch, pruned.student, pruned.drop
    depth = {"method": pruned.method, "drop_layers_1indexed": drop,
             "hf_layers_dropped_0indexed": [x - 1 for x in drop] if drop else None}
    summary = runtime.on_rank0(lambda: importance.summary(importance.scores_file(tmp), teacher))
    if runtime.is_rank0() and pruned.winner_dir is not None:  # the winner as pruned
        os.replace(pruned.winner_dir / "iter_0000000", tmp / "iter_0000000")
    runtime.barrier()

    def finish():
        interop.write_layout(tmp, student, 0, dtype=c.dtype, **plan.layout)
        checkpoint.write_sidecars(tmp, plan.source.hf_config, plan.source.tokenizer)
        imp, full = summary
        imp["depth"] = {**depth, "candidates": pruned.table}
        (tmp / "importance.json").write_text(json.dumps(imp, indent=1) + "\n")
        torch.save(full, tmp / "importance.pt")
        shutil.rmtree(tmp / "scores")
        if pruned.found is not None:
            from recipes.lib import tournament  # lazy: megatron and ModelOpt (see `run`)

            (tmp / "search.json").write_text(json.dumps(tournament.summary(
                c, teacher, pruned.found, pruned.search_s, plan.dc, pruned.cached),
                indent=1) + "\n")
            shutil.rmtree(tmp / "candidates", ignore_errors=True)
            shutil.rmtree(tmp / "tournament" / "teacher_logits", ignore_errors=True)
            if not c.search.keep_tournament:
                shutil.rmtree(tmp / "tournament", ignore_errors=True)
        (tmp / "config.yaml").write_text(config.to_yaml(cfg))

    runtime.on_rank0(finish)
    done = plan.sdir.commit({
        "input": {**plan.source.provenance(), "data": str(Path(c.data).resolve())},
        "arch": student.to_dict(), "num_params": student.num_params(),
        "teacher": {"arch": teacher.to_dict(), "num_params": teacher.num_params()},
        "dtype": c.dtype, "parallel": {"tp": 1, "pp": plan.layout["pp"]}, "depth": depth,
        "search": None if pruned.found is None else {
            "constraint": constraint(c, teacher), "candidates": len(pruned.found),
            "winner": next(x.candidate for x in pruned.found if x.winner),
            "decided_by": "tournament" if plan.dc else "zero-shot"},
        "metrics": {"params_ratio": student.num_params() / teacher.num_params(),
                    "calib_samples": c.calib_samples, "seq_length": c.seq_length}})
    runtime.on_rank0(lambda: (plan.sdir.out / "run.json").unlink(missing_ok=True))  # resume mark
    return done


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "prune", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
