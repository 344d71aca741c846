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
TP must be 1 (ModelOpt's requirement); PP may be anything.
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

from recipes.lib import (checkpoint, compat, config, interop, mapping, runtime, search, stage,
                         tokens, train, train_stage)
from recipes.lib.arch import (DEPTH_METHODS, WIDTH_KEYS, Arch, human, pruned_arch,
                               validate_layout)
from recipes.lib.stage import StageDir, fingerprint, read_manifest

log = logging.getLogger("recipes.prune")


@dataclasses.dataclass(kw_only=True)
class PruneConfig:
    input: str
    """The teacher: a convert (or teacher_correction) stage folder, or a Megatron-Bridge /
    Megatron-LM checkpoint folder (recipes/lib/interop.py)."""
    input_hf_config: str | None = None
    """Only for a Megatron-LM checkpoint as `input` (or one whose run_config.yaml should be
    overridden): the model's HF config.json, or an HF folder (its tokenizer is used too)."""
    data: str
    """The data stage folder (calibration from train, depth candidates from valid)."""
    output: str | None = None
    """Output folder; default <run.dir>/prune."""
    hidden_size: int | None = None
    """Target embedding channels (None: keep)."""
    ffn_hidden_size: int | None = None
    """Target MLP neurons (None: keep)."""
    num_attention_heads: int | None = None
    """Target query heads, a multiple of the KV groups (None: keep)."""
    num_layers: int | None = None
    """Target layers (None: keep, or teacher layers minus len(drop_layers))."""
    target_params: float | None = None
    """Instead of the sizes above: a parameter budget, absolute (4.5e9) or a fraction of the
    teacher's (0.55); ModelOpt's search finds the shapes (recipes/lib/search.py)."""
    target_memory_mb: float | None = None
    """Instead of the sizes above: a memory budget in MB (ModelOpt's estimate: bf16 weights + the
    KV cache of one 4096-token sequence)."""
    search: dict | None = None
    """The search and its tournament (recipes/lib/search.py DEFAULTS): hparams,
    max_width_pruning, max_depth_pruning, top_k, *_divisor, tournament_steps or
    tournament_tokens, score, keep_tournament, teacher_cache, teacher_cache_top_k,
    teacher_cache_max_gb."""
    tournament_job: str | None = None
    """Set by the Slurm launcher with cluster.tournament_jobs (recipes/launch.py), which runs
    the tournament's candidates as jobs of their own: `prepare` = the search, the candidates'
    checkpoints and the teacher-logit cache, then stop (nothing published); `c<i>` = candidate
    i's tournament distillation only, beside the other candidates' jobs; unset = what is left,
    then the winner and the output. Not part of the result."""
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
    te. ModelOpt prunes either (recipes/lib/compat.py teaches it the local spec)."""

    @property
    def searching(self) -> bool:
        return self.target_params is not None or self.target_memory_mb is not None

    def __post_init__(self):
        if self.depth_method not in DEPTH_METHODS:
            raise ValueError(f"prune.depth_method={self.depth_method!r}; use one of {DEPTH_METHODS}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"prune.dtype={self.dtype!r}; use fp32 or bf16")
        if self.drop_layers is not None and self.depth_method != "drop_layers":
            raise ValueError("prune.drop_layers is set but prune.depth_method="
                             f"{self.depth_method}; set prune.depth_method=drop_layers")
        for k in ("calib_samples", "seq_length", "micro_batch_size", "depth_eval_samples"):
            if getattr(self, k) < 1:
                raise ValueError(f"prune.{k} must be >= 1")
        if self.searching:
            if self.target_params is not None and self.target_memory_mb is not None:
                raise ValueError("set prune.target_params or prune.target_memory_mb, not both")
            sizes = [k for k in (*WIDTH_KEYS, "num_layers", "drop_layers")
                     if getattr(self, k) is not None]
            if sizes:
                raise ValueError(f"prune.target_* searches the shape: unset {sizes} (or drop the "
                                 "target and choose the sizes yourself)")
            target = self.target_params if self.target_params is not None else \
                self.target_memory_mb
            if not target > 0:
                raise ValueError(f"the prune target must be > 0, not {target}")
            search.settings(self.search)  # unknown keys and bad values, before any work
        elif self.search:
            raise ValueError("prune.search is set but no prune.target_params / "
                             "prune.target_memory_mb")
        if self.tournament_job is not None:
            s = search.settings(self.search) if self.searching else {}
            if not (s.get("tournament_steps") or s.get("tournament_tokens")):
                raise ValueError(f"prune.tournament_job={self.tournament_job!r} but prune runs no "
                                 "tournament (prune.target_* with prune.search.tournament_steps "
                                 "or tournament_tokens)")
            if not re.fullmatch(r"prepare|c[1-9]\d*", str(self.tournament_job)):
                raise ValueError(f"prune.tournament_job={self.tournament_job!r}: prepare or c<i> "
                                 "(the launcher sets it; leave it unset to run the whole stage)")
        if self.calib_samples % self.micro_batch_size:
            raise ValueError(f"prune.calib_samples={self.calib_samples} is not a multiple of "
                             f"prune.micro_batch_size={self.micro_batch_size}")


def check_data(c: PruneConfig, data_manifest: dict, need_valid: bool) -> None:
    for split, n in (("train", c.calib_samples), ("valid", c.depth_eval_samples if need_valid
                                                   else 0)):
        avail = tokens.available_windows(data_manifest["tokens"][split], c.seq_length)
        if n > avail:
            raise ValueError(f"prune needs {n} windows of {c.seq_length + 1} tokens from the "
                             f"{split} split, which has {data_manifest['tokens'][split]} tokens "
                             f"({avail} windows); lower prune.calib_samples / "
                             "prune.depth_eval_samples / prune.seq_length or add data")


@torch.no_grad()
def contiguous_candidates(model, arch: Arch, n_drop: int, heldout: torch.Tensor,
                          mbs: int) -> list[dict]:
    """Held-out loss of the teacher with each contiguous block of `n_drop` layers removed."""
    from recipes.lib import model as M

    layers = model.decoder.layers
    out = []
    starts = range(1, arch.num_layers - n_drop + 2)
    for s in tqdm(starts, desc="depth candidates", unit="block", disable=not runtime.is_rank0()):
        block = set(range(s, s + n_drop))
        model.decoder.layers = torch.nn.ModuleList(
            [m for m in layers if m.layer_number not in block])
        try:
            res = M.forward_loss(model, heldout, arch.vocab_size, mbs)
        finally:
            model.decoder.layers = layers
        if res is not None:
            out.append({"drop_layers": [s, s + n_drop - 1], "loss": res[0] / res[1]})
    return out


def importance_summary(scores_file: Path, arch: Arch) -> tuple[dict, dict]:
    """ModelOpt's saved activations -> per-layer head / neuron / channel importance."""
    state = torch.load(scores_file, map_location="cpu", weights_only=False)
    acts, layer_scores = state["local_activations"], state["layer_scores"]
    heads, neurons, channels = {}, {}, None
    for name, a in acts.items():
        if a is None:
            continue
        if name.endswith("self_attention") and not isinstance(a, dict):
            layer = int(name.split(".")[-2])
            per_head = a.pow(0.5).view(-1, arch.head_dim).norm(dim=1)
            heads[layer] = per_head.tolist()
        elif name.endswith(".mlp") and not isinstance(a, dict):
            neurons[int(name.split(".")[-2])] = a.pow(0.5)
        elif isinstance(a, dict) and a:
            channels = torch.stack([v.pow(0.5) for v in a.values()]).sum(0)
    summary = {
        "heads": {str(k): v for k, v in sorted(heads.items())},
        "neurons_quantiles": {str(k): torch.quantile(v.float(), torch.tensor(
            [0.0, 0.25, 0.5, 0.75, 1.0])).tolist() for k, v in sorted(neurons.items())},
        "channels": None if channels is None else channels.tolist(),
        "layer_scores_block_influence": {str(k): float(v) for k, v in layer_scores.items()},
    }
    return summary, {"neurons": neurons, "channels": channels, "heads": heads}


def run(cfg: config.Config) -> dict:
    c: PruneConfig = cfg.prune
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if tp != 1:
        raise ValueError(f"parallel.tp={tp}: ModelOpt Minitron pruning requires TP=1; prune with "
                         "parallel.tp=1 parallel.pp=N, then distill at any TP/PP")
    out = Path(c.output or Path(cfg.run.dir) / "prune")
    source = interop.open_source(c.input, "prune.input", ("convert", "teacher_correction"),
                                 c.input_hf_config)
    src, teacher = source.path, source.arch
    data_manifest = tokens.data_manifest(c.data, teacher.vocab_size, "prune.data")
    validate_layout(teacher, tp, pp)
    teacher.check_seq_length(c.seq_length, "prune.seq_length")
    spec = runtime.resolve_spec(c.spec)  # spec=te without Transformer Engine fails here
    s, dc, cache = (search.settings(c.search), None, None) if c.searching else (None, None, None)
    if s is not None:  # the architecture is what the search finds
        student, drop, n_drop = None, None, None
        check_data(c, data_manifest, need_valid=True)  # zero-shot scores on the valid split
        if s["tournament_steps"] or s["tournament_tokens"]:
            if "distill" not in cfg:
                raise ValueError("prune.search.tournament_steps / tournament_tokens need the "
                                 "distill section (the tournament distils each candidate with "
                                 "its settings)")
            d = cfg.typed("distill")
            dc = search.tournament_config(d, search.tournament_steps(s, d.global_batch_size,
                                                                     d.seq_length))
            train_stage.check_data(dc, "distill", teacher.vocab_size)
            cache = search.cache_plan(s, dc, teacher)
            if s["score"] == "lm_eval":
                search.check_lm_eval(s, dc, source)
    else:
        student, drop = pruned_arch(teacher, c)
        n_drop = teacher.num_layers - student.num_layers
        check_data(c, data_manifest, need_valid=n_drop > 0 and c.depth_method == "contiguous")
        if student.num_layers % pp:
            raise ValueError(f"the pruned model's {student.num_layers} layers do not divide into "
                             f"parallel.pp={pp} stages; choose a PP that divides both layer "
                             "counts")
    extra = {"pp": pp, "seed": cfg.run.seed}
    inputs = {"input": source.input(), "data": c.data}
    if dc is not None:  # the tournament's settings and data decide its result too (not the
        # distill stage's own input, teacher or output: the tournament's are prune's)
        extra["tournament"] = {k: v for k, v in dataclasses.asdict(dc).items() if k not in
                               {"input", "input_hf_config", "teacher", "teacher_hf_config",
                                *train.OPERATIONAL}}
        inputs.update({f"distill.data.{i}": d for i, d in enumerate(dc.data)})
    sdir = StageDir("prune", out, fingerprint(c, extra, ignore=OPERATIONAL), cfg.run.force,
                    inputs=inputs)
    resumable = {**{k: v for k, v in dataclasses.asdict(c).items() if k not in OPERATIONAL},
                 **extra}
    layout = {"tp": tp, "pp": pp, "spec": spec}  # of every checkpoint this stage writes
    if c.tournament_job not in (None, "prepare"):
        return tournament_candidate(c, cfg, sdir, resumable, source, s, dc, layout, cache)
    if sdir.already_done():
        log.info("%s is complete (same config): skipping", out)
        return read_manifest(out)
    if s is not None:
        log.info("prune %s: %s, search within %s", src, search.constraint(c, teacher),
                 {k: s[k] for k in ("hparams", "max_width_pruning", "max_depth_pruning",
                                    "top_k", "tournament_steps")})
    else:
        log.info("prune %s: %s -> %s (%s -> %s parameters)", src,
                 {k: getattr(teacher, k) for k in (*WIDTH_KEYS, "num_layers")},
                 {k: getattr(student, k) for k in (*WIDTH_KEYS, "num_layers")},
                 human(teacher.num_params()), human(student.num_params()))
    if drop:
        log.info("dropping layers %s (1-indexed) = HF model.layers.%s (0-indexed)", drop,
                 [x - 1 for x in drop])

    with runtime.distributed(tp, pp, cfg.run.seed):
        compat.enable_modelopt()
        import modelopt.torch.prune as mtp
        from modelopt.torch.prune.plugins import mcore_minitron as MM

        from recipes.lib import model as M

        # a tournament is long: its work folder survives a kill and the rerun continues
        tmp = sdir.begin(resumable=resumable if dc else None)

        def load_teacher():
            m = M.build(teacher, dtype=c.dtype, spec=c.spec, init=False)
            checkpoint.load(m, source.weights, teacher.vocab_size)
            return m

        model = load_teacher()
        calib = tokens.windows(c.data, "train", c.seq_length, c.calib_samples, cfg.run.seed)

        def forward_loop(m):
            bar = tqdm(total=c.calib_samples, desc="calibration", unit="seq",
                       disable=not runtime.is_rank0())
            for i in range(0, c.calib_samples, c.micro_batch_size * 8):
                M.forward_loss(m, calib[i: i + c.micro_batch_size * 8], teacher.vocab_size,
                               c.micro_batch_size)
                bar.update(min(c.micro_batch_size * 8, c.calib_samples - i))
            bar.close()

        scores_dir = tmp / "scores"  # ModelOpt writes <dir>/rank<r>.pth (searcher state)
        scores = scores_dir / f"rank{torch.distributed.get_rank()}.pth"
        table, found, winner_dir, cached = None, None, None, None
        if s is not None:
            t0 = time.time()
            heldout = tokens.windows(c.data, "valid", c.seq_length, c.depth_eval_samples,
                                     cfg.run.seed + 1)
            model, found = search.search(model, teacher, c, s, pp, forward_loop, scores_dir,
                                         heldout)
            search_s = time.time() - t0
            if dc is not None:  # (ModelOpt's note above about a manual KD step: this is it)
                log.info("tournament: %d candidates x %d steps of distillation from the teacher",
                         len(found), dc.train_iters)
                del model
                model = None
                folders = []
                for cand in found:  # each candidate's pruned checkpoint, once
                    folder = tmp / "candidates" / f"c{cand['candidate']}"
                    if not (folder / "arch.json").is_file():
                        m = search.prune_to(load_teacher(), cand["ss_config"], s, scores_dir)
                        write_pruned(m, search.arch_of(teacher, cand["ss_config"]), folder,
                                     c.dtype)
                    folders.append(folder)
                if c.tournament_job == "prepare":  # the candidates run as jobs of their own
                    search.run_tournament([], [], source, dc, tmp / "tournament", cfg.run.seed,
                                          s, layout, cache)
                    runtime.on_rank0(lambda: stage.atomic_write_text(
                        tmp / "tournament" / "prepared.json", json.dumps(found, indent=1)))
                    log.info("prepared %d tournament candidates in %s", len(found), tmp)
                    return {"prepared": [x["candidate"] for x in found]}
                cached = search.run_tournament(found, folders, source, dc, tmp / "tournament",
                                               cfg.run.seed, s, layout, cache)
            best = search.winner(found, s, dc is not None)
            winner_dir = tmp / "candidates" / f"c{best['candidate']}" if dc else None
            for cand in found:
                cand["winner"] = cand is best
            student = search.arch_of(teacher, best["ss_config"])
            n_drop = teacher.num_layers - student.num_layers
            if n_drop:
                drop = modelopt_dropped(scores, student.num_layers)
            log.info("search: %s wins (%s)", best["arch"], "tournament" if dc else "zero-shot")
        else:
            if n_drop and c.depth_method == "contiguous":
                heldout = tokens.windows(c.data, "valid", c.seq_length, c.depth_eval_samples,
                                         cfg.run.seed + 1)
                table = contiguous_candidates(model, teacher, n_drop, heldout,
                                              c.micro_batch_size)
                box = [table]
                torch.distributed.broadcast_object_list(box, src=0)
                table = box[0]
                best = min(table, key=lambda r: r["loss"])
                drop = list(range(best["drop_layers"][0], best["drop_layers"][1] + 1))
                log.info("contiguous: least harmful block %s (held-out loss %.4f)",
                         best["drop_layers"], best["loss"])
            export_config = {k: getattr(student, k) for k in WIDTH_KEYS}
            if n_drop and c.depth_method == "block_influence":
                export_config["num_layers"] = student.num_layers
            mode = MM.get_mcore_minitron_config(hidden_size_divisor=1, ffn_hidden_size_divisor=1,
                                                num_layers_divisor=1)
            model, _ = mtp.prune(model, mode=[("mcore_minitron", mode)],
                                 constraints={"export_config": export_config}, dummy_input=None,
                                 config={"forward_loop": forward_loop,
                                         "scores_path": str(scores_dir) + "/"})
            if drop:
                MM.drop_mcore_language_model_layers(model, layers_to_drop=drop)
            elif n_drop:  # block_influence
                drop = modelopt_dropped(scores, student.num_layers)

        summary = runtime.on_rank0(lambda: importance_summary(scores, teacher))
        if winner_dir is None:
            write_pruned(model, student, tmp, c.dtype)
            del model
        elif runtime.is_rank0():  # the tournament's winner, as pruned (before its short KD)
            os.replace(winner_dir / "iter_0000000", tmp / "iter_0000000")
        runtime.barrier()

        def finish():
            interop.write_layout(tmp, student, 0, dtype=c.dtype, **layout)
            checkpoint.write_sidecars(tmp, source.hf_config, source.tokenizer)
            imp, full = summary
            imp["depth"] = {"method": c.depth_method if n_drop and s is None else
                            "modelopt search" if n_drop else None,
                            "drop_layers_1indexed": drop, "hf_layers_dropped_0indexed":
                            [x - 1 for x in drop] if drop else None, "candidates": table}
            (tmp / "importance.json").write_text(json.dumps(imp, indent=1) + "\n")
            torch.save(full, tmp / "importance.pt")
            shutil.rmtree(scores_dir)
            if found is not None:
                (tmp / "search.json").write_text(json.dumps(search.summary(
                    c, teacher, s, found, search_s, dc, cached), indent=1) + "\n")
                shutil.rmtree(tmp / "candidates", ignore_errors=True)
                shutil.rmtree(tmp / "tournament" / "teacher_logits", ignore_errors=True)
                if not s["keep_tournament"]:
                    shutil.rmtree(tmp / "tournament", ignore_errors=True)
            (tmp / "config.yaml").write_text(config.to_yaml(cfg))

        runtime.on_rank0(finish)
        done = sdir.commit({
            "input": {**source.provenance(), "data": str(Path(c.data).resolve())},
            "arch": student.to_dict(), "num_params": student.num_params(),
            "teacher": {"arch": teacher.to_dict(), "num_params": teacher.num_params()},
            "dtype": c.dtype, "parallel": {"tp": tp, "pp": pp},
            "depth": {"method": c.depth_method if n_drop and s is None else
                      "modelopt search" if n_drop else None, "drop_layers_1indexed": drop,
                      "hf_layers_dropped_0indexed": [x - 1 for x in drop] if drop else None},
            "search": None if found is None else {
                "constraint": search.constraint(c, teacher), "candidates": len(found),
                "winner": next(x["candidate"] for x in found if x["winner"]),
                "decided_by": "tournament" if dc else "zero-shot"},
            "metrics": {"params_ratio": student.num_params() / teacher.num_params(),
                        "calib_samples": c.calib_samples, "seq_length": c.seq_length}})
        runtime.on_rank0(lambda: (out / "run.json").unlink(missing_ok=True))  # resume marker
        return done


OPERATIONAL = ("tournament_job",)  # how the work is split into jobs, not what it computes


def tournament_candidate(c: PruneConfig, cfg: config.Config, sdir: StageDir, resumable: dict,
                         source, s: dict, dc, layout: dict, cache) -> dict:
    """prune.tournament_job=c<i>: candidate i's tournament distillation in the work folder the
    `prepare` job left (its settings and inputs checked), locked for this candidate only; its
    result.json is what the final prune job reads."""
    i = int(c.tournament_job[1:])
    if not cfg.run.force and (sdir.out / "manifest.json").is_file():
        done = read_manifest(sdir.out)
        if done.get("fingerprint") == sdir.fp:
            log.info("%s is complete (same config): nothing left for candidate %d", sdir.out, i)
            return done
    tmp = sdir.join(resumable)
    prepared = tmp / "tournament" / "prepared.json"
    if not prepared.is_file():
        raise FileNotFoundError(f"{prepared} is missing: the prune job with "
                                "prune.tournament_job=prepare has not finished")
    found = json.loads(prepared.read_text())
    cand = next((x for x in found if x["candidate"] == i), None)
    if cand is None:  # the search found fewer shapes than top_k
        log.info("the search found %d candidates: no candidate %d to train", len(found), i)
        return {}
    with runtime.distributed(layout["tp"], layout["pp"], cfg.run.seed):
        search.run_tournament([cand], [tmp / "candidates" / f"c{i}"], source, dc,
                              tmp / "tournament", cfg.run.seed, s, layout, cache)
    return cand


def modelopt_dropped(scores_file: Path, keep: int) -> list[int]:
    """The 1-indexed layers ModelOpt dropped to keep `keep`: its lowest block-influence scores."""
    layer_scores = torch.load(scores_file, map_location="cpu", weights_only=False)["layer_scores"]
    ranked = sorted(layer_scores, key=lambda k: float(layer_scores[k]), reverse=True)
    return sorted(int(x) for x in ranked[keep:])


def write_pruned(model, arch: Arch, dest: Path, dtype: str) -> None:
    """The pruned `model` as a torch_dist checkpoint of `arch` at dest/iter_0000000, at the
    student's own layout: gathered as HF tensors, then written with convert's streaming writer
    (any PP, even layers); dest/arch.json last (a candidate's "done" mark). Collective."""
    from recipes.lib import model as M

    hf = M.gather_hf(model, arch)
    staging = dest / "staging"
    runtime.on_rank0(lambda: _write_staging(hf, staging))
    hf = None  # free the gathered tensors before the streaming save
    runtime.barrier()
    reader = checkpoint.HFReader(staging, mapping.hf_names(arch))
    checkpoint.save_from_hf(arch, reader, interop.iteration_dir(dest, 0), dtype, "save")
    runtime.barrier()
    if runtime.is_rank0():
        shutil.rmtree(staging)
        (dest / "arch.json").write_text(json.dumps(arch.to_dict()) + "\n")
    runtime.barrier()


def _write_staging(hf: dict, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)  # a killed candidate's leftovers
    folder.mkdir(parents=True)
    checkpoint.write_hf(hf, folder, 2 << 30)


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "prune", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
