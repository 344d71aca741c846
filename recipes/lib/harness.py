"""lm-evaluation-harness through its Python API, offline: the paper's benchmark suite as data,
local tasks (a task YAML over a local JSON/JSONL file, found through `include_path`), and a
held-out cloze task built from a data stage's test split.

A task whose data cannot be had on this machine (no network; the HF datasets cache is used
as is) is reported as unavailable with the reason, per task; no score is ever made up.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
from recipes.lib.errors import Refusal

log = logging.getLogger("recipes.harness")

# The paper's Table 1 (arXiv 2408.11796): task, shots, and the metric it reports.
SUITES = {
    "minitron": [
        {"task": "mmlu", "num_fewshot": 5, "metric": "acc,none"},
        {"task": "winogrande", "num_fewshot": 5, "metric": "acc,none"},
        {"task": "arc_challenge", "num_fewshot": 25, "metric": "acc_norm,none"},
        {"task": "hellaswag", "num_fewshot": 10, "metric": "acc_norm,none"},
        {"task": "gsm8k", "num_fewshot": 5, "metric": "exact_match,strict-match"},
        {"task": "truthfulqa_mc2", "num_fewshot": 0, "metric": "acc,none"},
    ],
}
CLOZE = "heldout_cloze"


def task_specs(suite: str | None, tasks: list | None) -> list[dict]:
    """The tasks to run: the suite's, then `tasks` (a name, or {task, num_fewshot, metric}),
    a task named in both taking `tasks`' settings."""
    specs = {s["task"]: dict(s) for s in SUITES[suite]} if suite else {}
    for t in tasks or []:
        t = {"task": t} if isinstance(t, str) else dict(t)
        specs[t["task"]] = {"num_fewshot": 0, "metric": "acc,none", **specs.get(t["task"], {}),
                            **t}
    return list(specs.values())


def offline() -> None:
    """Nothing is downloaded at run time: datasets and the hub read their caches only. The hub
    and datasets read the environment when first imported; where one already was (a caller's
    own import, the tests), its flag is set too, or a task whose data is not cached would wait
    on network retries instead of being reported unavailable at once."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        cfg = sys.modules["datasets"].config
        cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = True


def check_task(task: str, include_paths: list) -> None:
    """Refuse, naming the fix, a task lm-eval does not know (before any model runs); the
    held-out cloze task is built at run time."""
    if task == CLOZE:
        return
    from lm_eval.tasks import TaskManager  # lazy: seconds, only where a task runs

    tm = TaskManager(include_path=[str(p) for p in include_paths] or None)
    if task not in {*tm.all_tasks, *tm.all_groups}:
        raise Refusal(f"lm-eval has no task {task!r}: name an installed task, {CLOZE}, or a "
                      "local task YAML's `task:` with its folder in the task paths")


def cloze_task(windows: np.ndarray, tokenizer, folder: Path) -> dict:
    """A LAMBADA-style local task from held-out token windows: each passage's last word is the
    target, the text before it the context; scored as lm-eval's `acc` for a loglikelihood task
    (the target is the model's greedy continuation). Writes <folder>/{cloze.jsonl,
    heldout_cloze.yaml}; returns its spec."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for w in windows:
        text = tokenizer.decode(w.tolist(), skip_special_tokens=True)
        words = list(re.finditer(r"[A-Za-z]+", text))
        if len(words) < 8:
            continue
        # the last word of 3+ letters (not "a", "I", "of"), else the last word
        last = next((m for m in reversed(words) if len(m.group()) >= 3), words[-1])
        context = text[: last.start()].rstrip()
        docs.append({"context": context, "target": " " + last.group()})
    if not docs:
        return {"task": CLOZE, "unavailable": f"none of {len(windows)} held-out passages has 8 "
                "words; raise evaluate.cloze_tokens"}
    with open(folder / "cloze.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    (folder / f"{CLOZE}.yaml").write_text(
        f"task: {CLOZE}\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(folder / 'cloze.jsonl'))}}}}}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_target: '{{target}}'\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
    return {"task": CLOZE, "num_fewshot": 0, "metric": "acc,none", "documents": len(docs)}


def heldout_cloze(data: Path, test_tokens: int, seq_length: int, samples: int, seed: int,
                  tokenizer, folder: Path) -> dict:
    """`cloze_task` over up to `samples` windows of `seq_length` tokens from the test split
    (`test_tokens` long, from its manifest) of data stage `data`; returns its spec."""
    from recipes.lib import tokens  # lazy: megatron (tokens imports it on use)

    n = min(samples, tokens.available_windows(test_tokens, seq_length))
    windows = tokens.windows(data, "test", seq_length, n, seed).numpy()
    return cloze_task(windows, tokenizer, folder)


def run(models: dict, specs: list[dict], include_paths: list, batch_size: int,
        limit: int | None, dtype: str, seed: int) -> dict:
    """{task: {metric, num_fewshot, scores: {model: value}} | {unavailable: reason}}."""
    # lazy: lm-eval and torch cost seconds, and offline() must come first
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from recipes.lib import compat

    tm = TaskManager(include_path=[str(p) for p in include_paths] or None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict = {s["task"]: {"unavailable": s["unavailable"]} for s in specs if "unavailable" in s}
    specs = [s for s in specs if "unavailable" not in s]
    for name, path in models.items():
        lm = HFLM(pretrained=str(path), device=device, dtype=dtype, batch_size=batch_size)
        compat.hf_linears(lm.model)  # fp32 GEMMs through oneDNN where faster (CPU)
        for spec in specs:
            task = spec["task"]
            if "unavailable" in out.get(task, {}):
                continue
            try:
                r = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], num_fewshot=spec["num_fewshot"], limit=limit,
                    task_manager=tm, log_samples=False, bootstrap_iters=0, random_seed=seed,
                    numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
                value = float(r["results"][task][spec["metric"]])
            except Exception as e:  # noqa: BLE001 - missing task data is the usual cause
                reason = f"{type(e).__name__}: {str(e)[:300]}"
                log.warning("lm-eval %s unavailable here: %s", task, reason)
                out[task] = {"unavailable": reason + " (task data come from the HF datasets "
                             "cache; nothing is downloaded at run time)"}
                continue
            entry = out.setdefault(task, {"metric": spec["metric"],
                                          "num_fewshot": spec["num_fewshot"], "scores": {}})
            entry["scores"][name] = value
            log.info("lm-eval %s (%d-shot) %s: %s = %.4f", task, spec["num_fewshot"], name,
                     spec["metric"], value)
        del lm
    return out


def retention(results: dict, reference: str) -> None:
    """Add each model's score over the reference model's, per task (the paper's comparison)."""
    for entry in results.values():
        scores = entry.get("scores", {})
        ref = scores.get(reference)
        if ref:
            entry["retention"] = {k: v / ref for k, v in scores.items()}
