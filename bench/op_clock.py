"""Where a training step's time goes by kind of kernel: GEMMs, attention, and the rest.

`OpClock` is a TorchDispatchMode that adds up the wall time of every aten operator run inside
it, by class: GEMMs (mm, addmm, bmm, baddbmm, oneDNN's linear), attention (torch's
scaled_dot_product kernels) and every other operator. On a CPU operators are synchronous, so
their wall time is their cost; the mode's own Python per operator lands in the small ones, so
only the GEMM and attention sums are read as measurements, and the rest of a step is its
untimed time minus those two.

bench/distill.py runs one extra step under the clock on each side after its timed steps. Both
loops run the same GEMM and attention kernels on the same FLOPs, so

    ceiling = the reference's step / (our GEMMs + our attention)

is the most any rework of everything else in our step (norms, RoPE, SwiGLU, the losses, the
optimizer, Python) could give: the ratio if all of it took no time.

    python bench/op_clock.py OUT.json [recipes.distill arguments]   # ours, last step clocked
"""
from __future__ import annotations

import collections
import itertools
import json
import sys
import time
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

GEMMS = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten.baddbmm.", "mkldnn._linear_pointwise.")
ATTENTION = "scaled_dot_product"


def kind(op_name: str) -> str:
    """"gemm", "attention" or "other" for an operator's name as str(OpOverload) gives it."""
    if op_name.startswith(GEMMS):
        return "gemm"
    return "attention" if ATTENTION in op_name else "other"


class OpClock(TorchDispatchMode):
    """Seconds of wall time per kind() of operator run inside the block (`seconds`)."""

    def __init__(self):
        super().__init__()
        self.seconds = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[kind(str(func))] += time.perf_counter() - t0
        return out


def split(step_s: float, seconds: dict) -> dict:
    """A step of `step_s` seconds (untimed) as GEMMs, attention and the rest (the difference),
    from an OpClock's `seconds` of one such step."""
    gemm, attention = seconds.get("gemm", 0.0), seconds.get("attention", 0.0)
    return {"gemm_s": round(gemm, 3), "attention_s": round(attention, 3),
            "rest_s": round(step_s - gemm - attention, 3)}


def main() -> None:
    """Our distillation (recipes.distill's arguments) with its last training step clocked; the
    clock's seconds go to OUT.json."""
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    # lazy: the recipe is only needed when run as a script
    from recipes import distill
    from recipes.lib import train

    train_iters = int(next(a.split("=", 1)[1] for a in argv
                           if a.startswith("distill.train_iters=")))
    optimizer_step, steps, clock = train.optimizer_step, itertools.count(1), OpClock()

    def clocked(*args, **kwargs):  # the step as train.train calls it, the last one clocked
        if next(steps) < train_iters:
            return optimizer_step(*args, **kwargs)
        with clock:
            return optimizer_step(*args, **kwargs)

    train.optimizer_step = clocked
    distill.main(argv)
    out.write_text(json.dumps(dict(clock.seconds)))


if __name__ == "__main__":
    main()
