"""Stage `report`: one markdown page with plots for a run directory.

    python -m recipes.report --config conf/demo.yaml

Reads the manifests and logs the other stages left in <run.dir> (whichever exist): the
architecture and parameter table teacher vs student, the evaluation table, training and
validation curves, per-layer importance and the depth-candidate table, sample generations,
export parity and wall time per stage. Output: <run.dir>/report/{report.md, *.png, manifest.json}.
The plots (recipes/lib/plots.py) are imported when the report renders (`# lazy`): every stage's
config check imports this module, and matplotlib costs a second to import.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from recipes.lib import config, stage
from recipes.lib.arch import Arch, shape_rows
from recipes.lib.stage import StageDir, fingerprint, read_manifest

STAGES = ("data", "convert", "teacher_correction", "prune", "distill", "ce_trained",
          "export_teacher_corrected", "export_pruned", "export_ce_trained", "export", "evaluate",
          "from_scratch", "distill_original", "compare", "prune_search", "distill_search",
          "export_search", "search_compare")
DESCRIBED = {  # the demo's models (make demo, make demo-compare)
    "teacher": "the original model",
    "teacher_corrected": "the teacher fine-tuned on the distillation data (teacher correction)",
    "pruned": "the pruned student, before training",
    "distilled": "the pruned student after KD (forward KL) from distill.teacher",
    "ce_trained": "the pruned student after plain cross-entropy on the same tokens",
    "from_scratch": "random initialisation, then cross-entropy",
    "distilled_from_original": "the pruned student after KD from the original, uncorrected "
                               "teacher",
    "searched": "the shape prune's search + tournament chose at the same parameter budget, "
                "after the same KD as distilled",
}
SHAPE_NAMES = {"hidden_size": "hidden", "ffn_hidden_size": "FFN", "num_attention_heads": "heads",
               "num_moe_experts": "experts", "moe_ffn_hidden_size": "expert FFN",
               "num_layers": "layers"}


@dataclasses.dataclass(kw_only=True)
class ReportConfig:
    output: str | None = None
    """Output folder; default <run.dir>/report."""
    title: str = "Minitron compression report"
    """Page title."""


def _manifests(run: Path) -> dict:
    return {s: read_manifest(run / s) for s in STAGES if (run / s / "manifest.json").is_file()}


def _metrics(stage_dir: Path) -> list[dict]:
    f = stage_dir / "logs" / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


SEARCH_COLUMNS = {"tournament_kd_loss": "tournament KD loss",
                  "tournament_lm_loss": "tournament LM loss",
                  "tournament_lm_eval": "tournament lm-eval"}


def search_lines(res: dict) -> list[str]:
    t = res.get("tournament")
    cols = [k for k in SEARCH_COLUMNS if any(k in c for c in res["candidates"])]
    shape = list(res["candidates"][0]["arch"])  # the axes searched: a dense model's or an MoE's
    active = int(all(c.get("active_params") for c in res["candidates"]))
    lines = [f"Constraint {res['constraint']} (teacher {res['teacher_params'] / 1e6:.1f}M "
             f"parameters); ModelOpt's search, top {len(res['candidates'])} candidates, "
             f"decided by {res['decided_by']}. Search {res['search_s']:.0f} s"
             + (f"; tournament {t['steps']} steps x {t['global_batch_size']} x "
                f"{t['seq_length']} tokens ({t['tokens_per_candidate']:,} tokens) per candidate, "
                f"{t['total_s']:.0f} s in all; ranked by {t['score']}; {_teacher(t)}"
                if t else "") + ".", "",
             "| candidate | " + "".join(f"{SHAPE_NAMES.get(k, k)} | " for k in shape)
             + "parameters | " + ("active | " if active else "") + "zero-shot LM loss | "
             + "".join(f"{SEARCH_COLUMNS[k]} | " for k in cols) + "|",
             "|---|" + "---|" * (len(shape) + 2 + active + len(cols)) + "---|"]
    for c in res["candidates"]:
        lines.append(f"| c{c['candidate']} | " + "".join(f"{c['arch'][k]} | " for k in shape)
                     + f"{c['params'] / 1e6:.2f}M | "
                     + (f"{c['active_params'] / 1e6:.2f}M | " if active else "")
                     + f"{c['zero_shot_lm_loss']:.4f} | "
                     + "".join(f"{c[k]:.4f} | " for k in cols)
                     + f"{'**winner**' if c['winner'] else ''} |")
    return lines + [""]


def _teacher(t: dict) -> str:
    tc = t.get("teacher_cache")
    if not tc:  # online, or a search.json from before the cache was described
        return "the teacher ran online" if t["teacher"] == "run online" else \
            "the teacher's logits cached once"
    return (f"the teacher's logits cached once ({tc['batches']} micro-batches, {tc['mb']:,.1f} MB"
            + (")" if tc["encoding"] == "full" else
               f", top {tc['top_k']}, mean tail mass {tc['tail_mass_mean']:.4f})"))


def _throughput(heldout: dict) -> str:
    tps = {n: r["tokens_per_s"] for n, r in heldout.items() if "tokens_per_s" in r}
    return ("; forward " + ", ".join(f"{n} {v:.0f}" for n, v in tps.items()) + " tokens/s"
            if tps else "")


def described(run: Path) -> dict:
    """DESCRIBED, saying which teacher the student was distilled from."""
    d = dict(DESCRIBED)
    try:
        teacher = read_manifest(Path(read_manifest(run / "distill")["input"]["teacher"]))["stage"]
    except (OSError, ValueError, KeyError):
        return d
    if teacher == "teacher_correction":
        d["distilled"] = "the pruned student after KD (forward KL) from the corrected teacher"
        d["pruned"] = "pruned from the corrected teacher, before training"
    return d


def evaluation_lines(res: dict, manifest: dict, names: dict = DESCRIBED) -> list[str]:
    """One row per model: size, held-out loss and perplexity, the held-out cloze accuracy and
    the decode speed-up over the reference model where they were measured."""
    cloze = (res.get("lm_eval") or {}).get("heldout_cloze", {}).get("scores", {})
    speedup = res.get("speedup") or {}
    batches = sorted({b for s in speedup.values() for b in s}, key=lambda b: int(b.split("_")[1]))
    has_what = any(n in names for n in res["heldout"])
    head = ["model"] + ["what it is"] * has_what + ["parameters", "loss (nats/token)",
                                                     "perplexity"]
    head += ["held-out cloze accuracy"] * bool(cloze)
    head += [f"decode speed-up, batch {b.split('_')[1]}" for b in batches]
    lines = ["## Evaluation", "", f"Held-out test split, {manifest['windows']} windows of "
             f"{manifest['seq_length']} tokens, computed with transformers "
             f"({res.get('dtype', 'fp32')}{_throughput(res['heldout'])}) on the exported models."
             + (" Cloze: the last word of held-out passages (lm-evaluation-harness, greedy "
                "accuracy)." if cloze else "")
             + (f" Speed-up: decode tokens/s over {res.get('reference')}'s, same prompts and "
                "settings." if batches else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in res["heldout"].items():
        row = [name] + [names.get(name, "")] * has_what + [
            f"{r['params'] / 1e6:.1f}M", f"{r['loss']:.4f}", f"{r['perplexity']:.2f}"]
        row += [f"{cloze[name]:.3f}" if name in cloze else "-"] * bool(cloze)
        row += [f"{speedup[name][b]:.2f}x" if b in speedup.get(name, {}) else "-"
                for b in batches]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def lm_eval_lines(res: dict) -> list[str]:
    tasks = {t: r for t, r in (res.get("lm_eval") or {}).items() if t != "heldout_cloze"}
    if not tasks:
        return []
    models = list(res["heldout"])
    ref = res.get("reference")
    lines = ["## Benchmarks (lm-evaluation-harness)", "", f"Retention = score / {ref}'s, as the "
             "paper compares.", "", "| task | shots | metric | "
             + " | ".join(models) + " | retention |", "|---|---|---|" + "---|" * (len(models) + 1)]
    for t, r in tasks.items():
        if "unavailable" in r:
            lines.append(f"| {t} | | | {r['unavailable'][:80]} (not scored) |")
            continue
        ret = ", ".join(f"{k} {v:.1%}" for k, v in r.get("retention", {}).items() if k != ref)
        lines.append(f"| {t} | {r['num_fewshot']} | {r['metric']} | " + " | ".join(
            f"{r['scores'][m]:.4f}" if m in r["scores"] else "-" for m in models)
                     + f" | {ret} |")
    return lines + [""]


def speed_lines(res: dict) -> list[str]:
    if not res.get("speed"):
        return []
    lines = ["## Generation throughput (transformers generate)", "",
             "| model | batch | prefill tokens/s | decode tokens/s |", "|---|---|---|---|"]
    for name, s in res["speed"].items():
        lines += [f"| {name} | {b.split('_')[1]} | {v['prefill_tokens_per_s']:.0f} | "
                  f"{v['decode_tokens_per_s']:.1f} |" for b, v in s.items()
                  if b.startswith("batch_")]
    first = next(iter(res["speed"].values()))
    return lines + ["", f"{first['prompt_tokens']} prompt tokens, {first['new_tokens']} new "
                    f"tokens, median of {first['repeats']}, {first['device']} {first['dtype']}.",
                    ""]


def render(run: Path, out: Path, title: str) -> str:
    """The report's markdown for run directory `run`; the plots are written to `out`."""
    m = _manifests(run)
    names = described(run)
    lines = [f"# {title}", "", f"Run directory: `{run}`", ""]
    lines += architecture_lines(m) + search_sections(run, m, out)
    lines += evaluation_section(run, m, out, names) + comparison_sections(run, m, names)
    lines += training_section(run, out) + importance_section(run, m, out)
    exports = {k: v for k, v in m.items() if k.startswith("export")}
    if exports:
        lines += ["## Export parity", "", "| export | max abs logit difference, megatron vs "
                  "transformers (fp32) |", "|---|---|"]
        lines += [f"| {k} | {v['metrics'].get('parity_max_abs_diff', float('nan')):.2e} |"
                  for k, v in exports.items()]
        lines.append("")
    lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v.get('wall_s', float('nan')):.1f} |" for k, v in m.items()]
    return "\n".join(lines) + "\n"


def architecture_lines(m: dict) -> list[str]:
    if "prune" not in m:
        return []
    t, s = m["prune"]["teacher"], m["prune"]
    moe = bool(t["arch"].get("num_moe_experts"))
    lines = ["## Architecture", "", "| | teacher | student |", "|---|---|---|"]
    lines += [f"| {k} | {t['arch'][k]} | {s['arch'][k]} |" for k in shape_rows(moe)]
    lines += [f"| parameters | {t['num_params'] / 1e6:.1f}M | {s['num_params'] / 1e6:.1f}M "
              f"({s['num_params'] / t['num_params']:.1%}) |"]
    if moe:  # what one token runs through
        ta, sa = (Arch(**x["arch"]).num_active_params() for x in (t, s))
        lines += [f"| active parameters | {ta / 1e6:.1f}M | {sa / 1e6:.1f}M ({sa / ta:.1%}) |"]
    lines += [""]
    depth = s.get("depth", {})
    if depth.get("drop_layers_1indexed"):
        lines += [f"Dropped layers ({depth['method']}): {depth['drop_layers_1indexed']} "
                  f"(1-indexed) = HF `model.layers` {depth['hf_layers_dropped_0indexed']}", ""]
    return lines


def search_sections(run: Path, m: dict, out: Path) -> list[str]:
    from recipes.lib import plots  # lazy: matplotlib (see the module doc)

    lines = []
    for k, v in m.items():
        if v.get("stage") == "prune" and (run / k / "search.json").is_file():
            res = json.loads((run / k / "search.json").read_text())
            plots.plot_search(res, out / f"search_{k}.png")
            lines += [f"## Architecture search (`{k}`)", ""] + search_lines(res)
            lines += [f"![search](search_{k}.png)", ""]
    return lines


def evaluation_section(run: Path, m: dict, out: Path, names: dict) -> list[str]:
    from recipes.lib import plots  # lazy: matplotlib (see the module doc)

    if "evaluate" not in m:
        return []
    res = json.loads((run / "evaluate" / "results.json").read_text())
    lines = evaluation_lines(res, m["evaluate"], names)
    plots.plot_evaluation(res["heldout"], out / "evaluation.png")
    lines += ["", "![held-out perplexity](evaluation.png)", ""]
    lines += lm_eval_lines(res) + speed_lines(res)
    if res.get("generations"):
        lines += ["## Sample generations (greedy)", ""]
        for i, prompt in enumerate(res["prompts"]):
            lines += [f"**Prompt:** {prompt}", ""]
            lines += [f"- *{name}*: {gens[i].strip()!r}"
                      for name, gens in res["generations"].items()]
            lines.append("")
    return lines


def comparison_sections(run: Path, m: dict, names: dict) -> list[str]:
    lines = []
    for key, heading, note in (
            ("compare", "Why distillation: the same architecture and token budget, several ways",
             "Each student has the pruned architecture and the same steps, batches and learning "
             "rate."),
            ("search_compare", "Hand-picked shape vs the searched one (make demo-search)",
             "The same parameter budget, teacher, distillation steps and tokens; only the shape "
             "differs.")):
        if key in m:
            comp = json.loads((run / key / "results.json").read_text())["heldout"]
            lines += [f"## {heading}", "", note, "", "| model | how it was trained | parameters "
                      "| held-out loss (nats/token) | perplexity |", "|---|---|---|---|---|"]
            lines += [f"| {k} | {names.get(k, '')} | {v['params'] / 1e6:.1f}M | {v['loss']:.4f} "
                      f"| {v['perplexity']:.2f} |" for k, v in comp.items()]
            lines.append("")
    return lines


def training_section(run: Path, out: Path) -> list[str]:
    from recipes.lib import plots  # lazy: matplotlib (see the module doc)

    rows = _metrics(run / "distill")
    if not rows:
        return []
    plots.plot_training(rows, out / "training.png", _metrics(run / "ce_trained"))
    last = rows[-1]
    return ["## Distillation", "", "![training curves](training.png)", "",
            f"{last['step']} steps, {last['tokens']:,} tokens; final train KD loss "
            f"{last.get('kd_loss', float('nan')):.4f}, validation KD loss "
            f"{last.get('valid_kd_loss', float('nan')):.4f}." + training_speed(rows), ""]


def training_speed(rows: list[dict]) -> str:
    """The median logged step's speed, as a sentence (nothing for rows without it)."""
    steps = sorted((r for r in rows if "tokens_per_s" in r), key=lambda r: r["tokens_per_s"])
    if not steps:
        return ""
    mid = steps[len(steps) // 2]
    return (f" Median logged step: {mid['tokens_per_s']:,.0f} tokens/s"
            + (f", {mid['model_tflops_per_rank']:.3g} model TFLOP/s per rank"
               if "model_tflops_per_rank" in mid else "")
            + (f", MFU {mid['mfu']:.1%}" if "mfu" in mid else "") + ".")


def importance_section(run: Path, m: dict, out: Path) -> list[str]:
    from recipes.lib import plots  # lazy: matplotlib (see the module doc)

    if not (run / "prune" / "importance.json").is_file():
        return []
    imp = json.loads((run / "prune" / "importance.json").read_text())
    plots.plot_importance(imp, m["prune"]["arch"], out / "importance.png")
    lines = ["## Importance (calibration activations)", "", "![importance](importance.png)", ""]
    cands = (imp.get("depth") or {}).get("candidates")
    if cands:
        plots.plot_depth(cands, out / "depth_candidates.png")
        lines += ["![depth candidates](depth_candidates.png)", "",
                  "| dropped block (1-indexed) | teacher held-out loss |", "|---|---|"]
        lines += [f"| {c['drop_layers'][0]}-{c['drop_layers'][1]} | {c['loss']:.4f} |"
                  for c in cands]
        lines.append("")
    return lines


def run(cfg: config.Config) -> dict:
    c: ReportConfig = cfg.report
    run_dir = Path(cfg.run.dir)
    out = Path(c.output or run_dir / "report")
    inputs = {k: v["fingerprint"] for k, v in _manifests(run_dir).items()}
    sdir = StageDir("report", out, fingerprint(c), cfg.run.force,
                    inputs={k: run_dir / k for k in inputs if (run_dir / k).resolve()
                            != out.resolve()})
    if sdir.already_done():
        return read_manifest(out)
    tmp = sdir.begin()
    (tmp / "report.md").write_text(render(run_dir, tmp, c.title))
    manifest = sdir.commit({"input": inputs, "files": sorted(p.name for p in tmp.iterdir())})
    print(f"report: {out / 'report.md'}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "report", __doc__, argv, one_process=True)


if __name__ == "__main__":
    sys.exit(main())
