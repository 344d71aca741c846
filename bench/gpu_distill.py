"""Distillation step throughput on one GPU at the paper's shapes: Llama-3.1-8B teacher, its
4.5B width-pruned student (hidden 4096 -> 3072, FFN 14336 -> 9216), the recipe's own model
build, ModelOpt KD loss, megatron optimizer and training step (train.optimizer_step).

    python bench/gpu_distill.py --json out.json                    # every run, seq 4096 and 8192
    python bench/gpu_distill.py --json out.json --runs te-bf16,te-fp8 --seqs 4096
    python bench/gpu_distill.py --tiny --json out.json             # CPU: tiny shapes, local spec
    python bench/gpu_distill.py --json out.json --seqs 8192 --runs te-bf16,te-fp8,\
        te-fp8-teacher-fp8 --warmup 2 --steps 3 [--profile]          # the fp8 goals, an H200
    ... --layers 12                                                # the same on an 80 GB GPU

Runs (RUNS): local bf16, TE bf16, TE fp8 (tensorwise), TE fp8 with the first and last layer
in bf16, TE fp8 with the teacher in fp8 too, and TE fp8 with the blockwise and the delayed
recipes. Every run starts from the same weights (each
parameter drawn from a generator seeded by its name, so the local and the TE spec get the same
numbers) and trains on the same batches: `--microbatches` sequences per step, `--warmup` steps
untimed, then the median of `--steps` (16 micro-batches by default, as Megatron-Bridge
measures; the caching allocator's retries during the timed steps are logged). Each (run, seq)
is its own process, so no run's memory or peak leaks into the next; a run the machine cannot do
(no TE, no fp8) is skipped with why.

Per run: tokens/s; model TFLOP/s counted with attention (arch.distill_flops_per_token: 3x
the student's forward + the teacher's, causal attention at s/2 keys per token); MFU against
the GPU's dense bf16 peak (metrics.PEAK_TFLOPS; omitted for a GPU not listed, never another
chip's number); peak memory allocated and reserved; `plan`'s estimate for the same shapes and
its ratio to the peak; the resolved spec, fp8 recipe and TE attention backend; the KD loss
at every step; the share of the step's model FLOPs in fp8 matmuls; Python's garbage
collections during the timed steps (a host pause can idle the device). The summary compares each
run with TE bf16 (speed, last-step KD loss; for fp8, the Amdahl ceiling and the fp8 matmul
speed-up the measured speed implies by FLOPs, `fp8_speedups`) and checks the issue's goals.
`--profile` (bench/gpu_profile.py): six more steps, two of them traced by torch.profiler (of
either parity): per traced step its wall, host and kernel time (how much of it no kernel ran)
and kernel time by kind; the longest kernels; for an fp8 run beside TE bf16, what the two
profiles say (`by_kernel_time`: the fp8 GEMMs' speed-up, the casts' cost, the ceiling).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
from gpu_profile import fp8_kernel_ceilings, profile_step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> distill config fields; "te" runs need Transformer Engine, "fp8" ones a GPU with fp8
RUNS = {
    "local-bf16": {"spec": "local", "precision": "bf16"},
    "te-bf16": {"spec": "te", "precision": "bf16"},
    "te-fp8": {"spec": "te", "precision": "fp8", "fp8_recipe": "tensorwise"},
    "te-fp8-bf16-edges": {"spec": "te", "precision": "fp8", "fp8_recipe": "tensorwise",
                          "fp8_bf16_edge_layers": 1},
    "te-fp8-teacher-fp8": {"spec": "te", "precision": "fp8", "fp8_recipe": "tensorwise",
                           "teacher_precision": "fp8"},
    # the other Hopper recipes, for speed alone (delayed's checkpoints do not reload into TE 2.20)
    "te-fp8-blockwise": {"spec": "te", "precision": "fp8", "fp8_recipe": "blockwise"},
    "te-fp8-delayed": {"spec": "te", "precision": "fp8", "fp8_recipe": "delayed"},
}
TINY_RUNS = {"local-fp32": {"spec": "local", "precision": "fp32"}, **RUNS}
# the goals on one H200 at seq 8192, full depth, 16 micro-batches (TE bf16 reached 11,101
# tokens/s and 54.2% MFU there at 4 micro-batches, before the fused KD loss)
GOALS = {"te_bf16_mfu": 0.58, "fp8_tokens_per_s": 13600, "fp8_teacher_tokens_per_s": 15500,
         "fp8_kd_loss_rel": 0.005, "plan_rel": 0.05}
GOAL_SEQ, GOAL_DEVICE = 8192, "H200"


def archs(tiny: bool, layers: int | None = None):
    """Llama-3.1-8B and its 4.5B width-pruned student (tiny shapes with `tiny`); `layers`
    cuts both to that many layers, every per-token shape kept (a GPU too small for the
    whole depth)."""
    from recipes.lib.arch import Arch

    f = ROOT / "conf" / "arch" / "llama-3.1-8b.json"
    t = Arch.from_hf_config(json.loads(f.read_text()), str(f))
    if tiny:
        t = Arch(**{**t.to_dict(), "num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 224,
                    "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 16,
                    "vocab_size": 512})
    if layers:
        t = Arch(**{**t.to_dict(), "num_layers": layers})
    s = Arch(**{**t.to_dict(), "hidden_size": t.hidden_size * 3 // 4,
                "ffn_hidden_size": t.ffn_hidden_size * 9 // 14})
    return t, s


def skip_reason(run: str, seq: int, tiny: bool) -> str | None:
    """Why this machine cannot do `run` at `seq`, or None."""
    from recipes.lib import runtime, train_stage

    cfg = (TINY_RUNS if tiny else RUNS)[run]
    if cfg["spec"] == "te" and not runtime.have_te():
        return ("needs Transformer Engine on a CUDA GPU (the NVIDIA container, or "
                "`make te-kit` + scripts/gpu_check.sh on an offline host)")
    if cfg["spec"] == "local" and torch.cuda.is_available():
        t, s = archs(tiny)  # unfused attention keeps the bf16 softmax of every layer
        probs = s.num_layers * s.num_attention_heads * seq * seq * 2
        total = torch.cuda.get_device_properties(0).total_memory
        if probs > total / 2:
            return (f"the local spec's unfused attention keeps [heads x seq x seq] softmax "
                    f"outputs per layer, {probs / 2**30:.0f} GiB at seq {seq} of this GPU's "
                    f"{total / 2**30:.0f} GiB")
    if "fp8" in (cfg["precision"], cfg.get("teacher_precision")):
        need, name = train_stage.FP8_MIN_CAPABILITY[cfg.get("fp8_recipe", "tensorwise")]
        if torch.cuda.get_device_capability() < need:
            return f"fp8 needs compute capability {need[0]}.{need[1]} ({name}, or newer)"
    return None


def same_init(model, arch, seed: int) -> None:
    """Every parameter drawn from a generator seeded by its global (mapping) name: norms 1,
    the rest N(0, 1 / fan_in) (logits of unit scale, so the KL is of order 1 at any width).
    The local and TE specs name the same weight alike (TE_PARAM_ALIASES), so every run starts
    from the same numbers on a given device."""
    from recipes.lib import model as M

    with torch.no_grad():
        for name, _, p in M.local_params(model, arch):
            if "norm" in name:
                p.fill_(1.0)
                continue
            g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(
                name.encode()))
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)


def the_batches(vocab: int, seq: int, n: int, device) -> list[dict]:
    """The same `n` micro-batches of one random sequence each, in every run."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        toks = torch.randint(0, vocab, (1, seq + 1), generator=g)
        out.append({"tokens": toks[:, :-1], "labels": toks[:, 1:],
                    "loss_mask": torch.ones(1, seq), "position_ids": torch.arange(seq)[None]})
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def attention_backend(spec: str) -> dict | str:
    if spec != "te":
        return "megatron local core attention (unfused; torch SDPA on a CPU, compat.py)"
    try:  # lazy: TE only where it is installed
        from transformer_engine.pytorch.attention.dot_product_attention import (
            _attention_backends,
        )
    except ImportError as e:
        return f"not reported by this Transformer Engine ({e})"
    return {k: str(v) for k, v in _attention_backends.items()
            if k != "attention_params" and v is not None}


def measure(run: str, seq: int, a) -> dict:
    """One run at one sequence length, in this process."""
    from recipes import distill
    from recipes.lib import kd, runtime, train, train_stage
    from recipes.lib import model as M
    from recipes.lib.arch import distill_flops_per_token, fp8_flops_per_token, training_memory
    from recipes.lib.metrics import peak_tflops

    t, s = archs(a.tiny, a.layers)
    fields = (TINY_RUNS if a.tiny else RUNS)[run]
    cuda = torch.cuda.is_available()
    with runtime.distributed(1, 1):
        c = distill.DistillConfig(input="-", teacher="-", data=["-"], seq_length=seq,
                                  micro_batch_size=1, global_batch_size=a.microbatches,
                                  train_iters=a.warmup + a.steps, warmup_iters=0,
                                  precision_aware_optimizer=a.precision_aware,
                                  recompute_layers=a.recompute, **fields)
        train_stage.check_precision(c)
        train.check_optimizer(c, 1)
        teacher = M.build(t, **train_stage.build_kwargs(c, c.teacher_precision))
        same_init(teacher, t, 1)
        student = M.build(s, **train_stage.build_kwargs(c))
        same_init(student, s, 2)
        model, kl = kd.distillation_model(student, teacher, c, s.vocab_size)
        ddp, opt, sched = train.build_optimizer(model, c)
        run_step = train.scheduled(c, ddp, kd.make_step_fn(model, kl, s.vocab_size,
                                                           c.skip_lm_loss, False), None)
        step_batches = the_batches(s.vocab_size, seq, a.microbatches,
                                   next(model.parameters()).device)
        times, losses, retries = [], [], None
        with gc_pauses() as pauses:
            for i in range(a.warmup + a.steps):
                if cuda:
                    torch.cuda.synchronize()
                if i == a.warmup:
                    pauses.clear()  # the timed steps' only
                    retries = alloc_retries()
                t0 = time.perf_counter()
                reports, *_ = train.optimizer_step(ddp, opt, sched, run_step, step_batches)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                losses.append(train.reduce_report(reports)["kd_loss"])
        retries = None if retries is None else alloc_retries() - retries
        loss_path = kd.loss_path(torch.device("cuda" if cuda else "cpu"))
        prof = profile_step(lambda: train.optimizer_step(ddp, opt, sched, run_step,
                                                         step_batches)) if a.profile else None
    step_s = statistics.median(times[a.warmup:])
    fp8_flops = fp8_flops_per_token(t, s, c.precision, c.teacher_precision,
                                    c.fp8_bf16_edge_layers)
    tokens = a.microbatches * seq
    flops = tokens * distill_flops_per_token(t, s, seq) / step_s
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_tflops(device)
    est = training_memory(t, s, seq, 1, 1, 1, **c.memory_settings()) / 2**30
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else runtime.peak_rss_mb() / 1024
    spec = runtime.resolve_spec(c.spec)
    return {"run": run, "seq_length": seq, "device": device, "microbatches": a.microbatches,
            "step_s": times, "median_step_s": step_s, "tokens_per_s": tokens / step_s,
            "tflops": flops / 1e12, "mfu": None if peak is None else flops / 1e12 / peak,
            "peak_memory_gb": mem,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "plan_estimate_gb": est, "plan_over_peak": est / mem,
            "kd_loss": losses, "kd_loss_path": loss_path,
            "num_layers": [t.num_layers, s.num_layers], "alloc_retries_in_timed_steps": retries,
            "spec": spec, "gc_in_timed_steps": gc_summary(pauses),
            "fp8_flop_share": fp8_flops / distill_flops_per_token(t, s, seq),
            # of the GEMMs' FLOPs alone (at seq 0 attention has none)
            "fp8_gemm_share": fp8_flops / distill_flops_per_token(t, s, 0),
            "precision": c.precision, "teacher_precision": c.teacher_precision,
            "fp8": train_stage.fp8_recipe_kwargs(c) if c.precision == "fp8" else None,
            "optimizer": train.optimizer_kind(c), "fusions": M.fusions(c.spec),
            "attention": attention_backend(spec), **({"profile": prof} if prof else {})}


def alloc_retries() -> int | None:
    """The caching allocator's retries so far (each one a synchronising cudaFree and retry: a
    peak at the edge of the GPU's memory); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.memory_stats().get("num_alloc_retries", 0)


@contextlib.contextmanager
def gc_pauses():
    """[(generation, seconds)] of every collection Python's garbage collector makes meanwhile
    (a pause of the host, which a long collection turns into an idle device)."""
    import gc

    out, start = [], []

    def seen(phase, info):
        if phase == "start":
            start[:] = [time.perf_counter()]
        elif start:
            out.append((info["generation"], time.perf_counter() - start[0]))

    gc.callbacks.append(seen)
    try:
        yield out
    finally:
        gc.callbacks.remove(seen)


def gc_summary(pauses: list) -> dict:
    """Collections and seconds per generation."""
    gens = sorted({g for g, _ in pauses})
    return {f"gen{g}": {"collections": sum(1 for x, _ in pauses if x == g),
                        "seconds": sum(s for x, s in pauses if x == g)} for g in gens}


def fp8_speedups(share: float | None, speed: float) -> dict:
    """What an fp8 run's speed says of its fp8 matmuls, by Amdahl's law, taking every model
    FLOP of the bf16 step to cost the same time: `share` of them ran in fp8 (the layers'
    matmuls, arch.fp8_flops_per_token); the step's speed-up if those ran 2x faster and nothing
    else changed (the ceiling fp8 GEMMs could give), and the speed-up the fp8 matmuls, their
    casts and scaling included, must have had to give the measured `speed`."""
    if not share:
        return {}
    out = {"fp8_flop_share": share, "ceiling_at_2x_matmuls": 1 / (1 - share / 2)}
    if 1 / speed - 1 + share > 0:
        out["implied_fp8_matmul_speedup"] = share / (1 / speed - 1 + share)
    return out


def summarize(results: dict) -> dict:
    """Per sequence length: each run against TE bf16 (tokens/s ratio, last-step KD loss
    relative difference) and the issue's goals, met or not (None: not measured)."""
    out = {}
    for seq, runs in results.items():
        ok = {r: v for r, v in runs.items() if "tokens_per_s" in v}
        base = ok.get("te-bf16")
        rows = {}
        for r, v in ok.items():
            rows[r] = {"tokens_per_s": round(v["tokens_per_s"]), "mfu": v["mfu"],
                       "peak_memory_gb": round(v["peak_memory_gb"], 1),
                       "plan_over_peak": round(v["plan_over_peak"], 3)}
            if base:
                rows[r]["speed_vs_te_bf16"] = v["tokens_per_s"] / base["tokens_per_s"]
                rows[r]["kd_loss_rel_vs_te_bf16"] = \
                    abs(v["kd_loss"][-1] - base["kd_loss"][-1]) / abs(base["kd_loss"][-1])
                rows[r].update(fp8_speedups(v.get("fp8_flop_share"), rows[r]["speed_vs_te_bf16"]))
                if "profile" in base and "profile" in v and v.get("fp8_gemm_share"):
                    rows[r]["by_kernel_time"] = fp8_kernel_ceilings(
                        base["profile"], v["profile"], v["fp8_gemm_share"])
        out[seq] = {"runs": rows, "goals": goals_met(seq, runs, ok, rows)}
    return out


def goals_met(seq, runs: dict, ok: dict, rows: dict) -> dict:
    """The goals, each met (True), missed (False) or not measured here (None): the speeds only
    at their shape (an H200, seq 8192, full depth, 16 micro-batches), the KD loss, `plan` and
    completion at any."""
    full_depth = archs(False)[0].num_layers

    def shape(r):
        v = ok.get(r, {})
        return (int(seq) == GOAL_SEQ and GOAL_DEVICE in v.get("device", "")
                and v.get("num_layers", [0])[0] == full_depth and v.get("microbatches") == 16)

    def goal(r, key, test):
        v = rows.get(r, {}).get(key)
        return None if v is None or not shape(r) else test(v)

    fp8_runs = [r for r in ("te-fp8", "te-fp8-teacher-fp8") if r in rows]
    losses = [rows[r].get("kd_loss_rel_vs_te_bf16") for r in fp8_runs]
    return {
        "te-bf16 MFU >= 58%": goal("te-bf16", "mfu", lambda v: v >= GOALS["te_bf16_mfu"]),
        "te-fp8 >= 13,600 tokens/s": goal("te-fp8", "tokens_per_s",
                                          lambda v: v >= GOALS["fp8_tokens_per_s"]),
        "te-fp8-teacher-fp8 >= 15,500 tokens/s": goal(
            "te-fp8-teacher-fp8", "tokens_per_s",
            lambda v: v >= GOALS["fp8_teacher_tokens_per_s"]),
        "fp8 runs' last KD loss within 0.5% of te-bf16":
            None if not losses or None in losses
            else all(x <= GOALS["fp8_kd_loss_rel"] for x in losses),
        "plan within 5% of every run's peak": None if not rows else all(
            abs(v["plan_over_peak"] - 1) <= GOALS["plan_rel"] for v in rows.values()),
        "every run completed (none out of memory)":
            bool(ok) and all("error" not in v for v in runs.values()),
    }


def child(a) -> None:
    Path(a.json).write_text(json.dumps(measure(a.only, a.seqs[0], a), indent=2) + "\n")


def main() -> None:
    from recipes.lib import stage

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--runs", help=f"comma-separated, of {', '.join(TINY_RUNS)} (default: all "
                                   "of RUNS; --tiny: local-fp32,local-bf16)")
    ap.add_argument("--seqs", default="4096,8192", type=lambda x: [int(v) for v in x.split(",")])
    ap.add_argument("--microbatches", type=int, default=16,
                    help="per step (16, as Megatron-Bridge measures: per-step costs shared out "
                         "as in a real run's 36 or more)")
    ap.add_argument("--layers", type=int, default=None,
                    help="cut both models to this many layers, every per-token shape kept (an "
                         "80 GB GPU at seq 8192: 12)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    ap.add_argument("--precision-aware", action="store_true",
                    help="megatron's precision-aware optimizer (TE FusedAdam) in every run")
    ap.add_argument("--recompute", type=int, default=0,
                    help="distill.recompute_layers in every run (student layers recomputed)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per (run, seq)")
    ap.add_argument("--profile", action="store_true",
                    help="two steps traced by torch.profiler: wall, host, device time by kind")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # child: this run, in this process
    a = ap.parse_args()
    if a.only:
        return child(a)
    runs = a.runs.split(",") if a.runs else (["local-fp32", "local-bf16"] if a.tiny
                                             else list(RUNS))
    unknown = [r for r in runs if r not in TINY_RUNS]
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {', '.join(TINY_RUNS)}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    t, s = archs(a.tiny, a.layers)
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "teacher_params": t.num_params(), "student_params": s.num_params(),
           "settings": {k: getattr(a, k) for k in ("microbatches", "layers", "warmup", "steps",
                                                   "precision_aware", "recompute", "tiny",
                                                   "profile")},
           "results": {}}
    for seq in a.seqs:
        res = out["results"][seq] = {}
        for run in runs:
            if (why := skip_reason(run, seq, a.tiny)) is not None:
                res[run] = {"skipped": why}
                continue
            part = Path(a.json).with_suffix(f".{run}.{seq}.json")
            part.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "--json", str(part), "--only", run,
                   "--seqs", str(seq), *(f"--{k}={getattr(a, k)}" for k in
                                         ("microbatches", "warmup", "steps", "timeout",
                                          "recompute"))]
            cmd += ([f"--layers={a.layers}"] * bool(a.layers) + ["--tiny"] * a.tiny
                    + ["--precision-aware"] * a.precision_aware + ["--profile"] * a.profile)
            t0 = time.time()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                res[run] = json.loads(part.read_text()) if p.returncode == 0 else {
                    "error": f"exit {p.returncode}", "stderr_tail": p.stderr[-2000:]}
            except subprocess.TimeoutExpired:
                res[run] = {"error": f"timed out after {a.timeout} s"}
            res[run]["wall_s"] = time.time() - t0
            print(f"gpu_distill: seq {seq} {run}: " + (
                f"{res[run]['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in res[run]
                else res[run].get("error", "")), file=sys.stderr, flush=True)
    out["summary"] = summarize(out["results"])
    out["versions"] = stage.versions(stage.PACKAGES + ("transformer-engine",
                                                       "transformer-engine-torch"))
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["summary"], indent=2))
    if any("error" in r for res in out["results"].values() for r in res.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
