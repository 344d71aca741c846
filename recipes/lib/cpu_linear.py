"""fp32 linear layers through oneDNN on CPUs where it beats MKL (a CPU fast path; compat.py
routes megatron's and transformers' linear layers here).

PyTorch runs an fp32 matmul on x86 through MKL. On AMD CPUs MKL takes its AVX2 kernels;
oneDNN, the library inside PyTorch that already runs its bf16 matmuls, runs the same fp32 GEMM
with AVX-512 (docs/measured.md: the speed-ups measured). The result is an ordinary fp32 GEMM:
it differs from MKL's by the order of fp32 summation (~1e-6 relative), which
tests/unit/test_cpu_linear.py bounds.

Used only where it pays: a short probe in this process (`probe`, once) must measure
oneDNN at least MIN_GAIN times MKL's speed (on Intel CPUs with AVX-512 MKL is already at full
width and the probe keeps it), only for fp32 CPU tensors, and only for GEMMs of at least
MIN_MACS multiply-adds (below that oneDNN's call overhead loses).
"""
from __future__ import annotations

import functools
import logging
import time

import torch

log = logging.getLogger(__name__)

MIN_MACS = 1 << 23   # 256 x 128 x 256 measured even; a 64^3 GEMM is 2x slower through oneDNN
MIN_GAIN = 1.3       # far from what AMD and Intel CPUs measured either way (docs/measured.md)
FORCE: bool | None = None  # tests: True / False skip the probe


def _mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias) through oneDNN; a [..., k], b [n, k] (either may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


@functools.cache
def probe() -> tuple[bool, str]:
    """(use oneDNN, why): the best of 3 timings of one 1024 x 512 x 1536 fp32 GEMM each way."""
    if not torch.backends.mkldnn.is_available():
        return False, "PyTorch has no oneDNN"
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018 (absent from some builds)
    except (AttributeError, RuntimeError):
        return False, "PyTorch has no mkldnn._linear_pointwise"
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1024, 512, generator=g), torch.randn(1536, 512, generator=g)

    def best(f) -> float:
        f()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    gain = best(lambda: torch.matmul(x, w.t())) / best(lambda: _mm_t(x, w))
    use = gain >= MIN_GAIN
    why = (f"fp32 linear layers through oneDNN: {gain:.2f}x MKL's speed on this CPU" if use else
           f"fp32 linear layers through MKL (oneDNN measured {gain:.2f}x, below {MIN_GAIN}x)")
    log.info(why)
    return use, why


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` should take oneDNN: fp32 on the CPU, large enough, and
    faster here."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or x.dim() < 2 or weight.dim() != 2:
        return False
    if x.numel() // max(x.shape[-1], 1) * weight.numel() < MIN_MACS:
        return False
    return probe()[0] if FORCE is None else FORCE


class _Linear(torch.autograd.Function):
    """y = x @ w.T + b; the data gradient and the weight gradient are oneDNN GEMMs as well. The
    input is kept for the backward only when the weight is trained (as megatron's
    LinearWithFrozenWeight keeps only the weight)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return _mm_t(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm_t(g2, weight.t()).view(*g.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            gw = _mm_t(g2.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """torch.nn.functional.linear through oneDNN (callers check `usable` first)."""
    return _Linear.apply(x, weight, bias)
