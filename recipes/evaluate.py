"""Stage `evaluate`: what the compressed models are worth and what they buy, on exported HF
models with `transformers` (an independent implementation of the model).

    python -m recipes.evaluate --config conf/demo.yaml

`evaluate.models` names HF folders (e.g. teacher, pruned, distilled). Each is scored on the same
windows of the data stage's test split (mean next-token cross-entropy in nats, perplexity); with
lm-evaluation-harness (pinned) on the tasks of `evaluate.suite` (`minitron`: the paper's six,
with its shots and metrics) and `evaluate.tasks`, offline: a task whose data are not on this
machine is reported unavailable, never scored; optionally on a cloze task built from the
held-out split (`evaluate.cloze`: each passage's last word, LAMBADA-style); and for generation
throughput (prefill and decode tokens/s at each batch size; the speed-up over the reference
model). Output: <run.dir>/evaluate/{results.json, manifest.json}.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from recipes.lib import (compat, config, harness, hf_weights, integrity, runtime, speed, stage,
                         tokens)
from recipes.lib.stage import StageDir, fingerprint, read_manifest
from recipes.lib.errors import MissingInput, Refusal

log = logging.getLogger("recipes.evaluate")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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
    dtype: str = "auto"
    """auto | bf16 | fp32: the models' weights and compute, for every measurement (bf16 is fast
    only on a CPU with bf16 instructions, docs/measured.md); auto chooses as training's
    precision=auto does (runtime.auto_precision, recorded in results.json and the manifest)."""
    prompts: list | None = None
    """Prompts for sample generations (greedy)."""
    max_new_tokens: int = 40
    """Tokens generated per prompt."""
    reference: str | None = None
    """The model others are compared with (retention, speed-up); default the first."""
    suite: str | None = None
    """lm-evaluation-harness suite: minitron (MMLU 5-shot, Winogrande 5, ARC-C 25 acc_norm,
    HellaSwag 10 acc_norm, GSM8K 5, TruthfulQA mc2 0-shot), or null."""
    tasks: list | None = None
    """More lm-eval tasks, or overrides of the suite's: names or {task, num_fewshot, metric}."""
    task_paths: list | None = None
    """Folders of local lm-eval task YAMLs (lm-eval's include_path)."""
    lm_eval_limit: int | None = None
    """Documents per lm-eval task (null: all)."""
    lm_eval_batch_size: int = 8
    """Batch size of lm-eval's HF model."""
    cloze: bool = False
    """Add a last-word cloze task built from held-out windows of the test split."""
    cloze_samples: int = 200
    """Passages in the cloze task (at most the windows the test split has)."""
    cloze_tokens: int = 96
    """Tokens per cloze passage."""
    speed: bool = False
    """Measure generation throughput of every model (same prompts and settings)."""
    speed_models: list | None = None
    """Names to time when speed=true (default: all); models of one architecture run at one speed,
    so one of them suffices. Must include the reference. They are loaded together, after the
    scoring, and their runs interleaved (a drifting host slows them alike)."""
    speed_batch_sizes: list = dataclasses.field(default_factory=lambda: [1, 8])
    """Batch sizes of the throughput measurement."""
    speed_prompt_tokens: int = 128
    """Prompt tokens per sequence of the throughput measurement."""
    speed_new_tokens: int = 32
    """Generated tokens per sequence of the throughput measurement."""
    speed_repeats: int = 3
    """Timed repeats (median) after one warm-up."""

    def __post_init__(self):
        if not self.models:
            raise Refusal("evaluate.models is empty; name at least one HF folder")
        unknown = [n for n in self.include or [] if n not in self.models]
        if unknown:
            raise Refusal(f"evaluate.include names {unknown}, not in evaluate.models "
                          f"({sorted(self.models)})")
        self.models = {n: self.models[n] for n in (self.include or self.models)}
        self.reference = self.reference or next(iter(self.models))
        if self.reference not in self.models:
            raise Refusal(f"evaluate.reference={self.reference!r} is not one of the models "
                          f"{sorted(self.models)}")
        if self.dtype not in ("auto", *DTYPES):
            raise Refusal(f"evaluate.dtype={self.dtype!r}; use auto or one of "
                          f"{sorted(DTYPES)}")
        if self.suite is not None and self.suite not in harness.SUITES:
            raise Refusal(f"evaluate.suite={self.suite!r}; use one of {sorted(harness.SUITES)} "
                          "or null")
        for k in ("cloze_samples", "cloze_tokens", "speed_prompt_tokens", "speed_repeats",
                  "lm_eval_batch_size"):
            if getattr(self, k) < 1:
                raise Refusal(f"evaluate.{k} must be >= 1")
        if self.speed and self.speed_models is not None and (
                self.reference not in self.speed_models
                or any(n not in self.models for n in self.speed_models)):
            raise Refusal(f"evaluate.speed_models={self.speed_models} must name models being "
                          f"scored ({sorted(self.models)}) including the reference "
                          f"{self.reference!r}")
        if self.speed_new_tokens < 2 or not self.speed_batch_sizes or \
                any(b < 1 for b in self.speed_batch_sizes):
            raise Refusal("evaluate.speed_new_tokens must be >= 2 and speed_batch_sizes "
                          "positive, e.g. [1, 8]")


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch_size: int) -> dict:
    """Mean next-token cross-entropy (fp32 softmax whatever the model's dtype) over `windows`,
    `batch_size` windows per forward; with the forward's throughput."""
    total, n, t0 = 0.0, 0, time.perf_counter()
    for i in range(0, len(windows), batch_size):
        w = windows[i: i + batch_size].to(model.device)
        logits = model(w[:, :-1], use_cache=False).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum").item()
        n += w[:, 1:].numel()
    return {"loss": total / n, "perplexity": math.exp(total / n), "tokens": n,
            "tokens_per_s": n / (time.perf_counter() - t0)}


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").to(model.device)
        g = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tok.eos_token_id)
        out.append(tok.decode(g[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")  # what from_pretrained loads


def model_input(folder: Path):
    """What identifies a model folder as an input: our export (its manifest), else its HF files."""
    folder = Path(folder)
    return folder if (folder / "manifest.json").is_file() else hf_weights.hf_files(folder)


def exported_record(folder: Path) -> dict | None:
    """The size and CRC32 of each file of one of our exports (its manifest's "integrity"); None
    for another HF folder."""
    f = Path(folder) / "manifest.json"
    return json.loads(f.read_text()).get("integrity") if f.is_file() else None


def speedups(speed: dict, reference: str) -> dict:
    """Each model's decode tokens/s over the reference's, per batch size."""
    ref = speed[reference]
    return {name: {b: s[b]["decode_tokens_per_s"] / ref[b]["decode_tokens_per_s"]
                   for b in s if b.startswith("batch_")} for name, s in speed.items()}


@dataclasses.dataclass
class Results:
    """What evaluate measured (results.json; fields not measured are left out of it)."""
    reference: str
    dtype: str
    dtype_auto: dict | None
    device: str
    prompts: list
    heldout: dict = dataclasses.field(default_factory=dict)
    """{model: {loss, perplexity, tokens, tokens_per_s, params}} on the test split's windows."""
    generations: dict = dataclasses.field(default_factory=dict)
    """{model: [greedy continuation of each prompt]}."""
    speed: dict = dataclasses.field(default_factory=dict)
    """{model: generation throughput per batch size} (speed.generation_speeds)."""
    speedup: dict | None = None
    """{model: {batch_N: decode speed / the reference's}}."""
    lm_eval: dict | None = None
    """{task: harness.run's result, with retention against the reference}."""

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items()
                           if v is not None or k == "dtype_auto"}, indent=2) + "\n"


def score(name: str, path, rec: dict, c: EvaluateConfig, dtype: str, device: str,
          windows: torch.Tensor, results: Results) -> None:
    """One model on `device`, its files checked against `rec` (exported_record, {} for none)
    first: its held-out loss and generations, into `results`."""
    model = load_model(path, rec, dtype, device)
    h = results.heldout[name] = {**heldout_loss(model, windows, c.batch_size),
                                 "params": sum(p.numel() for p in model.parameters())}
    log.info("%s: held-out loss %.4f, perplexity %.2f (%s on %s, %.0f tokens/s)", name,
             h["loss"], h["perplexity"], dtype, device, h["tokens_per_s"])
    if c.prompts:
        tok = tokens.load_tokenizer(path, f"evaluate.models.{name}")
        results.generations[name] = generate(model, tok, c.prompts, c.max_new_tokens)


def load_model(path, rec: dict, dtype: str, device: str):
    """An HF model for scoring, its files checked against `rec` before they are read."""
    from transformers import AutoModelForCausalLM  # lazy: after harness.offline() in run()

    integrity.refuse_damaged(path, rec=rec)
    return compat.hf_linears(  # fp32 GEMMs through oneDNN where faster (CPU)
        AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval().to(device))


def time_generation(c: EvaluateConfig, records: dict, dtype: str, device: str, seed: int) -> dict:
    """The speed models' generation throughput, loaded together and their runs interleaved."""
    models = {n: load_model(c.models[n], records[n], dtype, device)
              for n in c.speed_models or c.models}
    vocab = min(m.config.vocab_size for m in models.values())  # ids every model has
    out = speed.generation_speeds(models, vocab, c.speed_prompt_tokens, c.speed_new_tokens,
                                  c.speed_batch_sizes, c.speed_repeats, seed)
    for name, s in out.items():
        log.info("%s: %s", name, {k: v for k, v in s.items() if k.startswith("batch_")})
    return out


def run(cfg: config.Config) -> dict:
    harness.offline()  # before transformers is imported: nothing is downloaded at run time
    c: EvaluateConfig = cfg.evaluate
    out = Path(c.output or Path(cfg.run.dir) / "evaluate")
    records = {}  # each model's integrity record: sizes checked now, checksums before its load
    for name, path in c.models.items():
        if not (Path(path) / "config.json").is_file():
            raise MissingInput(f"evaluate.models.{name}={path} is not an HF model folder "
                               "(no config.json); run export first")
        if not any((Path(path) / w).is_file() for w in HF_WEIGHTS):
            raise MissingInput(f"evaluate.models.{name}={path} holds no weights (none of "
                               f"{', '.join(HF_WEIGHTS)}); finish its download or export")
        records[name] = exported_record(path) or {}
        integrity.refuse_damaged(path, checksums=False, rec=records[name])
    data_manifest = read_manifest(c.data, ("data",), "evaluate.data")
    avail = tokens.available_windows(data_manifest["tokens"]["test"], c.seq_length)
    if avail < 1:
        raise Refusal(f"the test split of {c.data} has fewer than {c.seq_length + 1} tokens; "
                      "lower evaluate.seq_length")
    sdir = StageDir("evaluate", out, fingerprint(c), cfg.run.force,
                    inputs={**{f"models.{k}": model_input(p) for k, p in c.models.items()},
                            "data": c.data})
    if sdir.already_done():
        return read_manifest(out)
    tmp = sdir.begin()
    dtype, auto = c.dtype, None
    if dtype == "auto":
        auto = runtime.auto_precision(cfg.run.dir)
        dtype = auto["precision"]
        log.info("evaluate.dtype=auto: %s (%s)", dtype, auto["why"])
    windows = tokens.windows(c.data, "test", c.seq_length, min(avail, c.max_windows),
                             cfg.run.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # every measurement on the GPU
    results = Results(reference=c.reference, dtype=dtype, dtype_auto=auto, device=device,
                      prompts=c.prompts or [])
    for name, path in tqdm(c.models.items(), desc="evaluate", unit="model"):
        score(name, path, records[name], c, dtype, device, windows, results)
        if device == "cuda":
            torch.cuda.empty_cache()  # the next model's room
    if c.speed:
        results.speed = time_generation(c, records, dtype, device, cfg.run.seed)
        results.speedup = speedups(results.speed, c.reference)
    specs = harness.task_specs(c.suite, c.tasks)
    paths = list(c.task_paths or [])
    if c.cloze:
        tok = tokens.load_tokenizer(c.models[c.reference], f"evaluate.models.{c.reference}")
        specs.append(harness.heldout_cloze(c.data, data_manifest["tokens"]["test"],
                                           c.cloze_tokens, c.cloze_samples, cfg.run.seed + 2,
                                           tok, tmp / "cloze"))
        paths.append(tmp / "cloze")
    if specs:
        results.lm_eval = harness.run(c.models, specs, paths, c.lm_eval_batch_size,
                                      c.lm_eval_limit, str(DTYPES[dtype]).removeprefix("torch."),
                                      cfg.run.seed)
        harness.retention(results.lm_eval, c.reference)
    (tmp / "results.json").write_text(results.to_json())
    (tmp / "config.yaml").write_text(config.to_yaml(cfg))
    return sdir.commit({"input": {"models": {k: str(Path(v).resolve())
                                              for k, v in c.models.items()},
                                   "data": str(Path(c.data).resolve())},
                         "metrics": {k: v["loss"] for k, v in results.heldout.items()},
                         "lm_eval": {t: r.get("scores", r) for t, r in
                                     (results.lm_eval or {}).items()},
                         "speedup": results.speedup,
                         "windows": len(windows), "seq_length": c.seq_length,
                         "dtype": dtype, "dtype_auto": auto, "device": device})


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "evaluate", __doc__, argv, one_process=True)


if __name__ == "__main__":
    sys.exit(main())
