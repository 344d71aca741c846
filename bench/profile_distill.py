"""Where a distillation step's time goes: runs `recipes.distill` in this process under
torch.profiler (CPU) and prints the top operators by self time, plus a cProfile of the Python
side (cumulative), for the demo's shapes by default.

    .venv/bin/python bench/profile_distill.py [--run-dir runs/demo] [--steps 4] [overrides ...]

Needs the demo's data, convert and prune folders in --run-dir (bench/distill.py --demo builds
them). The numbers include one validation pass and the stage's loading, so read the step's
operators (mm, softmax, copies), not the total.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default=str(ROOT / "runs/bench_demo"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--stacks", action="store_true", help="group operators by Python stack")
    a, overrides = ap.parse_known_args()
    import torch

    from recipes import distill

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--config", str(ROOT / "conf/demo.yaml"), f"run.dir={a.run_dir}",
                f"distill.output={tmp}/distill", f"distill.train_iters={a.steps}",
                f"distill.teacher={a.run_dir}/convert",
                f"distill.eval_interval={a.steps}", f"distill.save_interval={a.steps}",
                "distill.warmup_iters=0",  # the demo's 8 would refuse short runs
                "run.log_level=WARNING", *overrides]
        prof = cProfile.Profile()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    with_stack=a.stacks) as tp:
            if not a.stacks:  # both use the interpreter's profile hook
                prof.enable()
            distill.main(argv)
            prof.disable()
    if not a.stacks:
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
    else:
        ev = sorted(tp.key_averages(group_by_stack_n=8), key=lambda e: -e.self_cpu_time_total)
        for e in ev[:a.top]:
            print(f"{e.self_cpu_time_total / 1e6:8.2f} s {e.count:7d}x {e.key}")
            for fr in e.stack:
                print(f"{'':22}{fr}")
    if not a.stacks:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(a.top)
        print(s.getvalue())


if __name__ == "__main__":
    main()
