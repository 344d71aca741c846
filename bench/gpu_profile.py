"""Where a distillation step's time goes on the device (bench/gpu_distill.py --profile): kernels
traced by torch.profiler, by kind, and what a TE bf16 and an fp8 profile of the same step say of
fp8: its GEMMs' speed-up, its casts' cost, and the step's ceiling by kernel time."""
from __future__ import annotations

import re
import time

import torch

# a kernel's kind by its name (first match), to see where a step's time goes
# (not fp8 casts: the optimizer's multi_tensor_scale, torch's elementwise kernels that load or
# store with a dtype cast, such as the fp32 main_grad += bf16 grad, or its `nocast` copies)
KERNEL_KINDS = [("attention", r"fmha|flash|attn|cudnn"),
                ("gemm", r"gemm|cutlass|nvjet|xmma|cublas|matmul|\bmm\b|addmm|linear"),
                ("optimizer", r"adam|multi_tensor"),
                ("fp8 cast / scale", r"quantiz|cast_|_cast|amax|fp8|e4m3|e5m2"), ("norm", r"norm"),
                ("softmax / loss", r"softmax|entropy|kl_div|logsumexp"),
                ("copy", r"copy|memcpy|memset|cat|fill")]
# torch.profiler's own step and optimizer annotations (where is_user_annotation is not set)
ANNOTATIONS = ("ProfilerStep", "Optimizer.")


def profile_step(step, top: int = 25, steps: int = 2) -> dict:
    """`steps` steps traced by torch.profiler, each after one untraced and one warm-up step (the
    profiler's start skews the step it starts in), so consecutive traced steps are of either
    parity (the H200's fp8 step times alternated, ~1.27 s / ~1.49 s). Per traced step: its wall
    time, the host's time until the step returned (close to the wall time: a step waits on
    the device for its gradient norm), its kernels' device time and count, the share of the
    wall time no kernel ran (large: launch-bound, or the device waits on the host), device
    time by kind (KERNEL_KINDS, names matched, so approximate); the `top` longest kernels of the
    first (self device time; each op's self CPU time without CUDA); the wall time of every step
    run here."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    traced, timing = [], []
    with profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=1, repeat=steps),
                 on_trace_ready=lambda p: traced.append((len(timing) - 1,
                                                         kernel_times(p, cuda)))) as p:
        for _ in range(3 * steps):
            t0 = time.perf_counter()
            step()
            host = time.perf_counter() - t0
            if cuda:
                torch.cuda.synchronize()
            timing.append((host, time.perf_counter() - t0))
            p.step()
    per_step = []
    for i, ev in traced:
        (host, wall), device = timing[i], sum(ms for _, ms, _ in ev)
        per_step.append({"step": i, "wall_ms": wall * 1e3, "host_ms": host * 1e3,
                         "device_ms": device, "kernels": sum(n for *_, n in ev),
                         "device_idle_share": max(0.0, 1 - device / (wall * 1e3)),
                         "by_kind_ms": by_kind(ev)})
    return {"device_ms": per_step[0]["device_ms"], "by_kind_ms": per_step[0]["by_kind_ms"],
            "top": [[name[:160], ms, n] for name, ms, n in traced[0][1][:top]],
            "steps": per_step, "wall_ms_every_step": [w * 1e3 for _, w in timing]}


def kernel_times(p, cuda: bool) -> list:
    """[(name, self device ms, calls)] of a finished trace's kernels, longest first (CPU ops'
    self time without CUDA). Not the annotations that torch.profiler also gives a device time,
    the span of the kernels under them (`ProfilerStep#2`, `Optimizer.step#FusedAdam.step`): on
    the H200 they doubled a step's device time and hid its idle share."""
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    gpu = torch.autograd.DeviceType.CUDA

    def kernel(e) -> bool:
        if getattr(e, "is_user_annotation", False) or e.key.startswith(ANNOTATIONS):
            return False
        return not cuda or getattr(e, "device_type", None) == gpu

    return sorted(((e.key, getattr(e, attr) / 1e3, e.count) for e in p.key_averages()
                   if kernel(e) and getattr(e, attr) > 0), key=lambda x: -x[1])


def by_kind(ev: list) -> dict:
    kinds: dict = {}
    for name, ms, _ in ev:
        kind = next((k for k, rx in KERNEL_KINDS if re.search(rx, name, re.I)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    return kinds


def fp8_kernel_ceilings(bf16: dict, fp8: dict, gemm_share: float) -> dict:
    """From the profiles (profile_step) of the same step in TE bf16 and in fp8: the kernels'
    speed-up; the speed-up of the GEMMs fp8 took (`gemm_share` of the bf16 step's GEMM FLOPs,
    their bf16 time taken in that share); the time the fp8 casts added; the step's speed-up
    were those GEMMs 2x faster and the casts free, the ceiling by kernel time. On the H200
    (seq 4096) the last was 1.21x where a FLOP count (fp8_speedups) gave 1.34x: 38% of the
    bf16 step is kernels with few FLOPs."""
    b, f = bf16["by_kind_ms"], fp8["by_kind_ms"]
    took = b.get("gemm", 0.0) * gemm_share
    saved = b.get("gemm", 0.0) - f.get("gemm", 0.0)
    cast = "fp8 cast / scale"
    return {"kernel_speedup": bf16["device_ms"] / fp8["device_ms"],
            "fp8_gemm_bf16_ms": took,
            "fp8_gemm_speedup": took / (took - saved) if took > saved > 0 else None,
            "fp8_cast_ms": f.get(cast, 0.0) - b.get(cast, 0.0),
            "ceiling_2x_gemms_free_casts": bf16["device_ms"] / (bf16["device_ms"] - took / 2)}
