"""The tournament's teacher-logit cache encodings (recipes/lib/logit_cache.py): what top-K keeps
exactly, what it loses, and how the encoding is chosen for a disk budget."""
import pytest
import torch

from recipes.lib import logit_cache as LC

VOCAB, PADDED = 1001, 1024


def teacher_logits(seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, PADDED, generator=g) * sharp
    x[..., VOCAB:] = 0.0  # megatron's padded rows
    return x


def real_log_probs(x):
    return x[..., :VOCAB].float().log_softmax(-1)


def test_full_encoding_replays_the_logits_bit_for_bit():
    x = teacher_logits().to(torch.bfloat16)
    assert torch.equal(LC.decode(LC.encode(x, VOCAB, None)), x)


@pytest.mark.parametrize("k", [8, 64, 500])
def test_top_k_keeps_the_top_log_probs_and_the_tail_mass_exactly(k):
    x = teacher_logits()
    entry = LC.encode(x, VOCAB, k)
    y = LC.decode(entry)
    assert y.shape == x.shape
    lx, ly = real_log_probs(x), real_log_probs(y)
    idx = entry["indices"].long()
    # the teacher's log-probabilities of its top K tokens, as they were
    torch.testing.assert_close(ly.gather(-1, idx), lx.gather(-1, idx), atol=1e-5, rtol=0)
    # the tail's total probability, as it was; spread evenly over the tail
    tail_x = 1 - lx.gather(-1, idx).exp().sum(-1)
    tail_y = 1 - ly.gather(-1, idx).exp().sum(-1)
    torch.testing.assert_close(tail_y, tail_x, atol=1e-5, rtol=0)
    torch.testing.assert_close(LC.tail_mass(entry), tail_x, atol=1e-5, rtol=0)
    mask = torch.ones_like(lx, dtype=torch.bool).scatter_(-1, idx, False)
    tail = ly[mask].view(*lx.shape[:2], -1)
    assert torch.allclose(tail, tail[..., :1])
    # so KD against the replay approaches KD against the teacher as K grows
    student = torch.randn(2, 5, VOCAB, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    kl = lambda lt: (lt.exp() * (lt - student)).sum(-1).mean()  # noqa: E731
    gap = abs(kl(ly) - kl(lx))
    assert gap < {8: 1.0, 64: 0.15, 500: 0.005}[k], gap


def test_top_k_of_the_whole_vocabulary_is_the_teacher():
    x = teacher_logits(sharp=1.0)
    entry = LC.encode(x, VOCAB, VOCAB)
    assert float(LC.tail_mass(entry).max()) < 1e-5
    torch.testing.assert_close(real_log_probs(LC.decode(entry)), real_log_probs(x), atol=1e-5,
                               rtol=0)


def test_the_encoding_fits_the_disk_budget():
    n, files = 1_000_000, 1000  # tokens, micro-batches
    extra = files * LC.FILE_OVERHEAD
    full = LC.choose(n, files, PADDED, VOCAB, "bf16", None, max_gb=4)
    assert full["encoding"] == "full"
    assert full["mb"] == pytest.approx((n * PADDED * 2 + extra) / 2**20, abs=0.1)
    small = LC.choose(n, files, PADDED, VOCAB, "bf16", None, max_gb=0.5)
    k = small["top_k"]
    assert small["encoding"] == "top-k" and k & (k - 1) == 0  # a power of two
    assert n * (k * 6 + 4) + extra <= 0.5 * 2**30 < n * (2 * k * 6 + 4) + extra  # the largest
    assert small["mb"] < small["full_mb"]
    assert LC.choose(n, files, PADDED, VOCAB, "bf16", None, max_gb=0.01)["encoding"] == "online"
    forced = LC.choose(n, files, PADDED, VOCAB, "fp32", 32, max_gb=4)
    assert forced["encoding"] == "top-k" and forced["top_k"] == 32
    assert forced["mb"] == pytest.approx((n * (32 * 8 + 4) + extra) / 2**20, abs=0.1)


def test_the_file_overhead_is_not_underestimated(tmp_path):
    entry = LC.encode(teacher_logits()[:1], VOCAB, 64)
    torch.save(entry, tmp_path / "e.pt")
    data = sum(v.numel() * v.element_size() for v in entry.values())
    assert (tmp_path / "e.pt").stat().st_size - data <= LC.FILE_OVERHEAD
