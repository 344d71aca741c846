"""What a training run logs: metrics.jsonl and TensorBoard on rank 0, and what each row
reports of the machine: speed (tokens/s, model TFLOP/s per rank, MFU on a GPU whose peak is
known) and peak memory."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from recipes.lib import runtime

# dense (no sparsity) peak TFLOP/s per datasheet; the longest name contained in the device's wins
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp8": 1513.0}),
    ("H100 NVL", {"bf16": 835.0, "fp8": 1671.0}),
    ("H100", {"bf16": 989.0, "fp8": 1979.0}),   # SXM
    ("H200", {"bf16": 989.0, "fp8": 1979.0}),
    ("H20", {"bf16": 148.0, "fp8": 296.0}),
    ("GH200", {"bf16": 989.0, "fp8": 1979.0}),
    ("B200", {"bf16": 2250.0, "fp8": 4500.0}),
    ("A100", {"bf16": 312.0}),                  # no fp8 on Ampere
]


class Metrics:
    """metrics.jsonl + TensorBoard on rank 0. On resume, rows after the resumed step are dropped
    so the files read as one run."""

    def __init__(self, logs: Path, resume_step: int):
        self.file = logs / "metrics.jsonl"
        self.tb = None
        if not runtime.is_rank0():
            return
        if self.file.exists():
            keep = [ln for ln in self.file.read_text().splitlines()
                    if ln and json.loads(ln)["step"] <= resume_step]
            self.file.write_text("".join(ln + "\n" for ln in keep))
        from torch.utils.tensorboard import SummaryWriter  # lazy: rank 0 only, ~1 s

        self.tb = SummaryWriter(str(logs / "tensorboard"), purge_step=resume_step + 1)

    def log(self, row: dict) -> None:
        if not runtime.is_rank0():
            return
        with open(self.file, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, row["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def last(self) -> dict:
        """The last row written (a run resumed after its final step trains no step)."""
        if not runtime.is_rank0() or not self.file.exists():
            return {}
        rows = self.file.read_text().splitlines()
        return json.loads(rows[-1]) if rows else {}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return runtime.peak_rss_mb()


def peak_tflops(device_name: str, precision: str = "bf16") -> float | None:
    """The datasheet's dense peak of `device_name` (torch.cuda.get_device_name()), or None for
    a device not listed (never another chip's number). "GH200" before "H200", "H100 PCIe"
    before "H100"."""
    for name, peaks in sorted(PEAK_TFLOPS, key=lambda x: -len(x[0])):
        if name in device_name:
            return peaks.get(precision)
    return None


def speed(tokens: int, seconds: float, flops_per_token: float | None) -> dict:
    """A step's speed: tokens/s of the whole job; with the model's FLOPs per token
    (arch.distill_flops_per_token) its TFLOP/s per rank, and on a GPU whose dense bf16 peak is
    known the MFU against it (fp8 runs too, as Megatron-LM reports it)."""
    row = {"tokens_per_s": tokens / seconds}
    if flops_per_token:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        row["model_tflops_per_rank"] = tokens * flops_per_token / seconds / world / 1e12
        peak = peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        if peak:
            row["mfu"] = row["model_tflops_per_rank"] / peak
    return row
