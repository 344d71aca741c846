"""precision=auto (training stages, the tournament) and evaluate.dtype=auto: bf16 on a GPU; on a
CPU bf16 only where it is natively fast (bf16 instructions and a bf16 matmul at least as fast
as fp32), else fp32; decided once per run directory and kept there."""
import json

import pytest

from recipes.lib import runtime, train_config


def test_the_decision_both_ways():
    assert runtime.choose_precision(True, set(), None)["precision"] == "bf16"
    no = runtime.choose_precision(False, {"avx2", "avx512f"}, 0.12)  # Ice Lake: 28 vs 234
    assert no["precision"] == "fp32" and "without native bf16" in no["why"]
    assert "0.12x" in no["why"]
    amx = runtime.choose_precision(False, {"amx_bf16", "avx512_bf16"}, 2.9)
    assert amx["precision"] == "bf16" and "amx_bf16, avx512_bf16" in amx["why"]
    slow = runtime.choose_precision(False, {"avx512_bf16"}, 0.8)  # flags, but not fast here
    assert slow["precision"] == "fp32" and "0.80x" in slow["why"]


def test_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert runtime.cpu_flags(str(info)) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert runtime.cpu_flags(str(tmp_path / "none")) == set()


def test_the_probe_measures_within_its_budget():
    import time

    t0 = time.perf_counter()
    ratio = runtime.bf16_matmul_speedup(n=256, budget_s=0.1)
    assert ratio > 0 and time.perf_counter() - t0 < 1.0


@pytest.fixture
def machine(monkeypatch):
    """A CPU whose flags and bf16 speed the test sets; counts the probes."""
    state = {"flags": set(), "speedup": 1.0, "probes": 0}

    def probe(*_a, **_k):
        state["probes"] += 1
        return state["speedup"]

    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: state["flags"])
    monkeypatch.setattr(runtime, "bf16_matmul_speedup", probe)
    return state


def test_one_choice_per_run_directory(machine, tmp_path):
    machine.update(flags={"avx512_bf16"}, speedup=1.6)
    first = runtime.auto_precision(tmp_path / "a")
    assert first["precision"] == "bf16" and machine["probes"] == 1
    assert json.loads((tmp_path / "a" / runtime.AUTO_FILE).read_text()) == first
    machine.update(flags=set(), speedup=0.1)  # the run moved to another machine: kept
    assert runtime.auto_precision(tmp_path / "a") == first and machine["probes"] == 1
    assert runtime.auto_precision(tmp_path / "b")["precision"] == "fp32"  # a new run decides


def test_training_configs_resolve_auto_for_student_and_teacher(machine, tmp_path):
    from recipes.distill import DistillConfig

    c = DistillConfig(input="-", teacher="-", data=["-"], train_iters=4, warmup_iters=1)
    assert c.precision == "auto" and c.teacher_precision == "auto"
    resolved, choice = train_config.resolve_precision(c, tmp_path)
    assert resolved.precision == resolved.teacher_precision == "fp32" == choice["precision"]
    fixed = DistillConfig(input="-", teacher="-", data=["-"], train_iters=4, warmup_iters=1,
                          precision="fp32", teacher_precision="bf16")
    assert train_config.resolve_precision(fixed, tmp_path) == (fixed, None)


def test_auto_follows_pytorchs_own_kernels_not_only_the_cpu():
    """ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU (or a build without AVX-512 kernels): torch's
    bf16 kernels are not native there (some refuse: 'pack_vnni2 is only supported when avx512
    is supported'), so auto picks fp32 as on an AVX2-only CPU."""
    from recipes.lib import runtime

    flags = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma"}
    assert runtime.aten_flags(flags, "AVX512") == flags
    narrow = runtime.aten_flags(flags, "AVX2")
    assert narrow == {"avx2", "fma"}
    assert runtime.choose_precision(False, narrow, 1.5)["precision"] == "fp32"
    arm = {"asimd", "bf16", "sve"}
    assert runtime.aten_flags(arm, "DEFAULT") == arm  # only x86's AVX-512 kernels matter
