"""The fused KD / LM losses (recipes/lib/kd.py, kd.FUSED), the CPU's chunks and the GPU's
vocabulary tiles (kd.TILES; here the tiles' pure-torch mirror), against the paths they replace:
ModelOpt's LogitsKLLoss and megatron's vocab_parallel_cross_entropy on masked logits. Equal
losses and equal gradients, over a padded vocabulary, at two temperatures, in fp32 and bf16,
with a loss mask."""
from __future__ import annotations

import types

import pytest
import torch

from recipes.lib import runtime

VOCAB, PADDED = 1000, 1024  # 24 padded columns whose logits are garbage


def logits(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, PADDED, generator=g) * 3
    x[..., VOCAB:] = 50.0  # would dominate any softmax that let them in
    return x.to(dtype)


@pytest.fixture(scope="module")
def groups():
    with runtime.distributed(1, 1):
        yield


def run(kind, fused, dtype, temperature, monkeypatch, tiles=False):
    from recipes.lib import kd

    monkeypatch.setattr(kd, "FUSED", fused)
    monkeypatch.setattr(kd, "TILES", tiles)
    s, b = 300, 2  # 600 tokens: more than two chunks
    student = logits((s, b), dtype, 0).requires_grad_()
    teacher = logits((s, b), dtype, 1)
    labels = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(2))
    mask = (torch.rand(b, s, generator=torch.Generator().manual_seed(3)) > 0.2).float()
    before = student.detach().clone(), teacher.clone()
    if kind == "kl":
        crit = kd.VocabLogitsKLLoss(types.SimpleNamespace(tensor_model_parallel_size=1,
                                                          sequence_parallel=False),
                                    VOCAB, temperature)
        crit.labels = labels
        loss = kd.reduce_sum(mask)(crit(student, teacher))
        # the student's NLL the fused KL logs (None on ModelOpt's path), masked and summed
        nll = None if crit.nll is None else (crit.nll * mask).sum()
    else:  # the LM loss takes [b, s, v]
        student = student.detach().transpose(0, 1).contiguous().requires_grad_()
        loss = (kd.lm_loss(student, labels, VOCAB) * mask).sum()
        nll = None
    if kind == "kl":  # the losses read the logits, never scale them in place
        assert torch.equal(student.detach(), before[0]) and torch.equal(teacher, before[1])
    loss.backward()
    return loss.detach(), student.grad, nll


def close(a, b) -> bool:
    """Largest difference against the largest entry: fp32 rounding, or bf16's (one rounding
    of the gradient more or less than autograd's chain)."""
    tol = 1e-6 if a.dtype == torch.float32 else 1e-3
    err = (a.float() - b.float()).abs().max() / b.float().abs().max()
    print(f"{a.dtype} gradient: max error / max entry = {err:.2e}")
    return err < tol


@pytest.mark.parametrize("tiles", [False, True], ids=["chunks", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_kl_equals_modelopt(groups, monkeypatch, dtype, temperature, tiles):
    loss_f, grad_f, nll = run("kl", True, dtype, temperature, monkeypatch, tiles)
    loss_m, grad_m, _ = run("kl", False, dtype, temperature, monkeypatch)
    assert loss_f.item() > 1.0
    assert loss_f.item() == pytest.approx(loss_m.item(), rel=1e-5)
    assert grad_f.dtype == grad_m.dtype == dtype
    assert (grad_f[..., VOCAB:] == 0).all() and (grad_m[..., VOCAB:] == 0).all()
    assert close(grad_f, grad_m)
    # the student's NLL that the fused KL logs comes out equal to the LM loss
    lm, _, _ = run("lm", False, dtype, 1.0, monkeypatch)
    assert nll.item() == pytest.approx(lm.item(), rel=1e-5)


@pytest.mark.parametrize("tiles", [False, True], ids=["chunks", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_lm_loss_equals_megatron(groups, monkeypatch, dtype, tiles):
    loss_f, grad_f, _ = run("lm", True, dtype, 1.0, monkeypatch, tiles)
    loss_m, grad_m, _ = run("lm", False, dtype, 1.0, monkeypatch)
    assert loss_f.item() == pytest.approx(loss_m.item(), rel=1e-5)
    assert (grad_f[..., VOCAB:] == 0).all()
    assert close(grad_f, grad_m)


def test_gpu_sized_chunks_give_the_same_losses(groups, monkeypatch):
    """A GPU takes chunks of GPU_CHUNK_BYTES (523 rows at Llama-3's 128k vocabulary) where a
    CPU takes 16: the same losses and gradients, here with 256-row chunks over 600 tokens (the
    last one partial)."""
    from recipes.lib import kd

    assert kd.chunk_rows(128256, torch.device("cuda")) == 523
    assert kd.chunk_rows(128256, torch.device("cpu")) == kd.CHUNK_TOKENS == 16
    loss_s, grad_s, nll_s = run("kl", True, torch.float32, 2.0, monkeypatch)
    monkeypatch.setattr(kd, "chunk_rows", lambda vocab, device: 256)
    loss_b, grad_b, nll_b = run("kl", True, torch.float32, 2.0, monkeypatch)
    assert loss_b.item() == pytest.approx(loss_s.item(), rel=1e-6)
    assert nll_b.item() == pytest.approx(nll_s.item(), rel=1e-6)
    assert close(grad_b, grad_s)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("teacher", [True, False], ids=["kd", "lm"])
def test_fused_losses_match_fp64(teacher, temperature, padded):
    """token_losses against the textbook definitions in fp64: KL(teacher || student) at
    temperature T from log-softmaxes, the NLL at T = 1, and the gradient of the trained one
    (KL: (softmax(s / T) - softmax(t / T)) / T; NLL: softmax - onehot), over a padded and an
    unpadded vocabulary."""
    from recipes.lib import kd

    if not teacher and temperature != 1.0:
        pytest.skip("the LM loss has no temperature")
    width = PADDED if padded else VOCAB
    s = logits((37,), torch.float32, 0)[:, :width].contiguous().requires_grad_()
    t = logits((37,), torch.float32, 1)[:, :width].contiguous() if teacher else None
    y = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(2))
    w = torch.rand(37, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kl, nll = kd.token_losses(s, t, y, VOCAB, temperature)
    ((kl if teacher else nll) * w.float()).sum().backward()
    s64 = s.detach().double()[:, :VOCAB].requires_grad_()
    nll64 = -s64.log_softmax(1).gather(1, y[:, None]).squeeze(1)
    if teacher:
        ls, lt = (s64 / temperature).log_softmax(1), (t.double()[:, :VOCAB] / temperature
                                                      ).log_softmax(1)
        kl64 = (lt.exp() * (lt - ls)).sum(1)
        (kl64 * w).sum().backward()
        torch.testing.assert_close(kl.double(), kl64, rtol=2e-6, atol=1e-6)
    else:
        (nll64 * w).sum().backward()
    torch.testing.assert_close(nll.double(), nll64.detach(), rtol=2e-6, atol=1e-6)
    assert (s.grad[:, VOCAB:] == 0).all()
    torch.testing.assert_close(s.grad[:, :VOCAB].double(), s64.grad, rtol=1e-6, atol=2e-7)
