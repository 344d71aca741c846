"""The two-pass vocabulary-tile losses (recipes/lib/kd_tiles.py): the pure-torch mirror of the
kernel's tiling against the textbook definitions in fp64, against the CPU's chunked path
(kd.token_losses), over tensor-parallel vocabulary shards (two ranks under torchrun), and the
Triton kernel against the mirror where Triton runs (a GPU, or its interpreter: make
test-triton). The loss mask is a per-token weight: masked tokens get no gradient at all."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from recipes.lib import kd_tiles
from tests.conftest import ROOT, torchrun

VOCAB, N = 1000, 37


def inputs(width: int, dtype, seed: int = 0, teacher_width: int | None = None):
    """Student and teacher logits [N, width] (padded columns hold 50, which would dominate any
    softmax that let them in), labels, and a loss mask with zeros."""
    g = torch.Generator().manual_seed(seed)

    def draw(w):
        x = torch.randn(N, w, generator=g) * 3
        x[:, VOCAB:] = 50.0
        return x.to(dtype)

    s, t = draw(width), draw(teacher_width or width)
    y = torch.randint(0, VOCAB, (N,), generator=g)
    mask = (torch.rand(N, generator=g, dtype=torch.float64) > 0.25).double()
    return s, t, y, mask


def reference(s, t, y, temperature, w_kl, w_nll):
    """fp64 KL(teacher || student) at T, NLL at T = 1, and the gradient of
    sum(w_kl kl + w_nll nll) over the real columns (None weights: that loss is not trained)."""
    s64 = s.detach().double()[:, :VOCAB].requires_grad_()
    ls = (s64 / temperature).log_softmax(1)
    lt = (t.double()[:, :VOCAB] / temperature).log_softmax(1)
    kl = (lt.exp() * (lt - ls)).sum(1)
    nll = -s64.log_softmax(1).gather(1, y[:, None]).squeeze(1)
    total = sum((loss * w).sum() for loss, w in ((kl, w_kl), (nll, w_nll)) if w is not None)
    total.backward()
    return kl.detach(), nll.detach(), s64.grad


def tiled(s, t, y, temperature, w_kl, w_nll, impl="torch", **kw):
    s = s.detach().clone().requires_grad_()
    kl, nll = kd_tiles.tiled_losses(s, t if w_kl is not None else None, y, VOCAB,
                                    temperature, impl=impl, **kw)
    total = sum((loss * w.float()).sum() for loss, w in ((kl, w_kl), (nll, w_nll))
                if w is not None)
    total.backward()
    return kl.detach(), nll.detach(), s.grad


TOL = {torch.float32: dict(rtol=2e-6, atol=5e-6), torch.bfloat16: dict(rtol=1e-2, atol=2e-4)}


def check_against_fp64(impl, trained, temperature, width, dtype, teacher_width=None):
    s, t, y, mask = inputs(width, dtype, teacher_width=teacher_width)
    w_kl = mask * 0.7 if "kl" in trained else None
    w_nll = mask * 0.3 if "lm" in trained else None
    kl, nll, grad = tiled(s, t, y, temperature, w_kl, w_nll, impl)
    kl64, nll64, grad64 = reference(s.float(), t.float(), y, temperature, w_kl, w_nll)
    if w_kl is not None:
        torch.testing.assert_close(kl.double(), kl64, rtol=2e-6, atol=5e-6)
    torch.testing.assert_close(nll.double(), nll64, rtol=2e-6, atol=5e-6)
    assert grad.dtype == dtype
    assert (grad[:, VOCAB:] == 0).all(), "padded columns got a gradient"
    assert (grad[mask == 0] == 0).all(), "a masked token got a gradient"
    torch.testing.assert_close(grad[:, :VOCAB].double(), grad64.to(dtype).double(), **TOL[dtype])


CASES = [  # (what is trained, temperature, width of the student's logits)
    ("kl", 1.0, 1024), ("kl", 2.0, 1024), ("lm", 1.0, 1024), ("kl+lm", 2.0, 1024),
    ("kl+lm", 1.0, VOCAB),
]


@pytest.fixture
def small_tiles(monkeypatch):
    """256-column tiles: 1024 columns are four tiles, 1000 end in a partial one."""
    monkeypatch.setattr(kd_tiles, "BLOCK", 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("trained,temperature,width", CASES)
def test_mirror_matches_fp64(small_tiles, trained, temperature, width, dtype):
    check_against_fp64("torch", trained, temperature, width, dtype)


@pytest.mark.parametrize("teacher_width", [1024, 1152], ids=["narrower", "wider"])
def test_teacher_of_another_padding(small_tiles, teacher_width):
    """A teacher padded to another width than the student (TP = 1) is read over the real
    vocabulary alone."""
    check_against_fp64("torch", "kl+lm", 2.0, 1088, torch.float32, teacher_width)


def test_one_tile_covers_a_small_vocabulary():
    assert kd_tiles.block_for(1000) == 1024 and kd_tiles.block_for(128256) == kd_tiles.BLOCK
    check_against_fp64("torch", "kl+lm", 2.0, 1024, torch.float32)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("teacher", [True, False], ids=["kd", "lm"])
def test_mirror_equals_the_chunked_path(small_tiles, teacher, temperature):
    """The CPU's chunked path (kd.token_losses) and the tiles give the same losses and
    gradients (fp32 rounding: the sums run in another order)."""
    from recipes.lib import kd

    if not teacher and temperature != 1.0:
        pytest.skip("the LM loss has no temperature")
    s, t, y, mask = inputs(1024, torch.float32)
    w = mask.float()
    a = s.clone().requires_grad_()
    kl_c, nll_c = kd.token_losses(a, t if teacher else None, y, VOCAB, temperature)
    ((kl_c if teacher else nll_c) * w).sum().backward()
    kl, nll, grad = tiled(s, t, y, temperature, mask if teacher else None,
                          None if teacher else mask)
    torch.testing.assert_close(kl, kl_c, rtol=2e-6, atol=5e-6)
    torch.testing.assert_close(nll, nll_c, rtol=2e-6, atol=5e-6)
    torch.testing.assert_close(grad, a.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_tensor_parallel_shards_give_the_full_vocabulary_losses():
    """Two ranks (gloo) each hold half the padded columns, the second rank's half all padding
    in one case: the maxima and sums all-reduced give every rank the one-rank losses, and each
    rank the gradient of its own columns (tests/unit/tp_tiles.py)."""
    p = torchrun("tests.unit.tp_tiles", timeout=120)
    assert p.stdout.count("tp_tiles ok") == 2, p.stdout


def triton_runs() -> bool:
    return kd_tiles.triton_ready() and (torch.cuda.is_available()
                                        or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not triton_runs(), reason="needs Triton on a GPU or TRITON_INTERPRET=1 "
                    "(make test-triton)")
@pytest.mark.parametrize("trained,temperature,width", CASES)
def test_triton_kernel_matches_mirror_and_fp64(small_tiles, trained, temperature, width):
    """The kernel on this host (a GPU, or Triton's interpreter on a CPU) against fp64, and
    against the mirror in bf16 (same tiles; only the order of the lanes' sums differs, so a
    gradient entry may round to the neighbouring bf16 value)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    check_against_fp64("triton", trained, temperature, width, torch.float32)
    s, t, y, mask = inputs(width, torch.bfloat16)
    args = (t, y, temperature, mask if "kl" in trained else None,
            mask if "lm" in trained else None)
    on = lambda a: None if a is None else a.to(dev)  # noqa: E731
    got = tiled(on(s), on(t), on(y), temperature, *map(on, args[3:]), impl="triton")
    want = tiled(s, *args, impl="torch")
    for g, w in zip(got[:2], want[:2]):  # the losses, fp32
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5)
    # the bf16 gradient: a rounding apart at most (one bf16 step is 2^-7 relative)
    torch.testing.assert_close(got[2].cpu().float(), want[2].float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.skipif(not kd_tiles.triton_ready(), reason="needs Triton (make test-triton)")
def test_triton_kernels_compile_for_hopper_without_a_gpu():
    """Every variant of both kernels through Triton's compiler down to an sm_90 cubin, on this
    host: the checks the interpreter leaves out (types, loop-carried values, constexpr
    branches). A subprocess: the interpreter, once chosen, holds for the process."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    code = ("from recipes.lib import kd_triton\n"
            "print('\\n'.join(kd_triton.compile_for(90, 16)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(p.stdout.split("\n")) >= 7, p.stdout


@pytest.mark.parametrize("kernel", ["agrees", "raises", "differs"])
def test_an_untried_kernel_is_checked_before_training_trusts_it(monkeypatch, caplog, kernel):
    """kernel_works runs the kernel once on a small problem against the mirror: a kernel that
    fails to compile or run, or gives other numbers, is not used, with a warning that says why
    (the chunked losses give the same values). Here "triton" is the mirror, a failing one, or
    one off by 1%."""
    mirror_stats, mirror_grad = kd_tiles._stats, kd_tiles._grad

    def stats(impl, *a):
        if impl == "triton" and kernel == "raises":
            raise RuntimeError("PassManager::run failed")
        out = mirror_stats("torch", *a)
        if impl == "triton" and kernel == "differs":
            out[:, 4] *= 1.01
        return out

    monkeypatch.setattr(kd_tiles, "_stats", stats)
    monkeypatch.setattr(kd_tiles, "_grad", lambda impl, *a: mirror_grad("torch", *a))
    monkeypatch.setattr(kd_tiles, "triton_ready", lambda: True)
    # first asked inside a validation step's no_grad, as it may be
    with caplog.at_level("WARNING", logger="recipes.kd"), torch.no_grad():
        ok = kd_tiles.kernel_works("cpu")
    assert ok == (kernel == "agrees")
    if kernel == "agrees":
        assert not caplog.records
    else:
        reason = "PassManager::run failed" if kernel == "raises" else "differ from the torch"
        assert "KD-loss kernel is not used on cpu" in caplog.text and reason in caplog.text


@pytest.mark.skipif(not triton_runs(), reason="needs Triton on a GPU or TRITON_INTERPRET=1 "
                    "(make test-triton)")
def test_the_kernel_passes_the_check_training_runs_first():
    assert kd_tiles.kernel_works("cuda" if torch.cuda.is_available() else "cpu")
