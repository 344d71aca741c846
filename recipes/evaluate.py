"""Stage `evaluate`: held-out loss and perplexity of exported HF models, computed with
transformers (an independent implementation of the model), plus sample generations and,
where its task data are on this machine, lm-evaluation-harness.

    python -m recipes.evaluate --config conf/demo.yaml

`evaluate.models` names HF folders (e.g. teacher, pruned, distilled). Each is scored on the same
windows of the data stage's test split: mean next-token cross-entropy (nats) and perplexity.
Output: <run.dir>/evaluate/{results.json, manifest.json}.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from recipes.lib import checkpoint, config, stage, tokens
from recipes.lib.stage import StageDir, fingerprint, read_manifest

log = logging.getLogger("recipes.evaluate")


@dataclasses.dataclass(kw_only=True)
class EvaluateConfig:
    models: dict
    """{name: HF folder}, e.g. {teacher: ..., pruned: ..., distilled: ...}."""
    include: list | None = None
    """Names in `models` to score, in this order (default: all)."""
    data: str
    """The data stage folder; its test split is scored."""
    output: str | None = None
    """Output folder; default <run.dir>/evaluate."""
    seq_length: int = 512
    """Tokens per window."""
    max_windows: int = 64
    """Upper bound on test windows (all available if fewer)."""
    batch_size: int = 4
    """Windows per forward pass."""
    prompts: list | None = None
    """Prompts for sample generations (greedy)."""
    max_new_tokens: int = 40
    """Tokens generated per prompt."""
    lm_eval_tasks: list | None = None
    """lm-evaluation-harness tasks, run only where lm_eval and the task data are available."""

    def __post_init__(self):
        if not self.models:
            raise ValueError("evaluate.models is empty; name at least one HF folder")
        unknown = [n for n in self.include or [] if n not in self.models]
        if unknown:
            raise ValueError(f"evaluate.include names {unknown}, not in evaluate.models "
                             f"({sorted(self.models)})")
        self.models = {n: self.models[n] for n in (self.include or self.models)}


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch_size: int) -> dict:
    total, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i: i + batch_size]
        logits = model(w[:, :-1], use_cache=False).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum").item()
        n += w[:, 1:].numel()
    return {"loss": total / n, "perplexity": math.exp(total / n), "tokens": n}


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        g = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tok.eos_token_id)
        out.append(tok.decode(g[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def lm_eval(models: dict, tasks: list[str]) -> dict:
    """lm-evaluation-harness on each model, or the reason it could not run here."""
    try:
        import lm_eval
    except ImportError:
        return {"skipped": "lm-evaluation-harness is not installed (pip install lm-eval) and "
                           "its task data must be on this machine (HF datasets cache)"}
    results = {}
    for name, path in models.items():
        try:
            r = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path}", tasks=tasks)
            results[name] = {t: r["results"][t] for t in tasks}
        except Exception as e:  # noqa: BLE001 - offline task data is the usual cause
            return {"skipped": f"lm-evaluation-harness could not run {tasks}: "
                               f"{type(e).__name__}: {str(e)[:300]} (task data are fetched from "
                               "the Hugging Face hub; pre-populate its cache to run offline)"}
    return results


def model_input(folder: Path):
    """What identifies a model folder as an input: our export (its manifest), else its HF files."""
    folder = Path(folder)
    return folder if (folder / "manifest.json").is_file() else checkpoint.hf_files(folder)


def run(cfg: config.Config) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c: EvaluateConfig = cfg.evaluate
    out = Path(c.output or Path(cfg.run.dir) / "evaluate")
    for name, path in c.models.items():
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"evaluate.models.{name}={path} is not an HF model folder "
                                    "(no config.json); run export first")
    data_manifest = read_manifest(c.data, ("data",), "evaluate.data")
    avail = tokens.available_windows(data_manifest["tokens"]["test"], c.seq_length)
    if avail < 1:
        raise ValueError(f"the test split of {c.data} has fewer than {c.seq_length + 1} tokens; "
                         "lower evaluate.seq_length")
    sdir = StageDir("evaluate", out, fingerprint(c), cfg.run.force,
                    inputs={**{f"models.{k}": model_input(p) for k, p in c.models.items()},
                            "data": c.data})
    if sdir.already_done():
        return read_manifest(out)
    tmp = sdir.begin()
    windows = tokens.windows(c.data, "test", c.seq_length, min(avail, c.max_windows),
                             cfg.run.seed)
    results = {"heldout": {}, "generations": {}, "prompts": c.prompts or []}
    for name, path in tqdm(c.models.items(), desc="evaluate", unit="model"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        results["heldout"][name] = {**heldout_loss(model, windows, c.batch_size),
                                    "params": sum(p.numel() for p in model.parameters())}
        log.info("%s: held-out loss %.4f, perplexity %.2f", name,
                 results["heldout"][name]["loss"], results["heldout"][name]["perplexity"])
        if c.prompts:
            tok = AutoTokenizer.from_pretrained(path)
            results["generations"][name] = generate(model, tok, c.prompts, c.max_new_tokens)
        del model
    if c.lm_eval_tasks:
        results["lm_eval"] = lm_eval(c.models, c.lm_eval_tasks)
        if "skipped" in results["lm_eval"]:
            log.warning("lm-eval skipped: %s", results["lm_eval"]["skipped"])
    (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (tmp / "config.yaml").write_text(config.to_yaml(cfg))
    return sdir.commit({"input": {"models": {k: str(Path(v).resolve())
                                              for k, v in c.models.items()},
                                   "data": str(Path(c.data).resolve())},
                         "metrics": {k: v["loss"] for k, v in results["heldout"].items()},
                         "windows": len(windows), "seq_length": c.seq_length})


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "evaluate", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
