"""What a training run logs: metrics.jsonl and TensorBoard on rank 0, and the peak memory
each row reports."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from recipes.lib import runtime


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
