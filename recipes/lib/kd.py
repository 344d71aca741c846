"""Losses over the real vocabulary. Megatron pads the vocab (to a multiple of 128); the padded
logits are not the model's and must not enter a softmax: both the KD loss and the LM loss mask
them to a large negative value, out of place (a new tensor), which also keeps megatron's
vocab-parallel cross-entropy, which works in place on fp32 logits, away from the logits ModelOpt
captured for the KD loss (without the copy, computing the LM loss in the same step silently
changed the KL: 5.35 instead of 0.49 in tests/stages/test_distill.py's KD = KL check)."""
from __future__ import annotations

import torch

from recipes.lib import compat

compat.apply()
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from modelopt.torch.distill.plugins.megatron import LogitsKLLoss  # noqa: E402

NEG = -1.0e9  # finite: exp() underflows to 0 and kl_div stays NaN-free


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A copy of vocab-parallel `logits` [..., v_local] with padded entries set to NEG."""
    v_local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * v_local
    pad = torch.arange(start, start + v_local, device=logits.device) >= vocab_size
    return logits.masked_fill(pad, NEG) if pad.any() else logits.clone()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token next-token cross-entropy [b, s] from vocab-parallel logits [b, s, v_local]."""
    masked = mask_padded_vocab(logits, vocab_size).float()
    return tensor_parallel.vocab_parallel_cross_entropy(
        masked.transpose(0, 1).contiguous(), labels.transpose(0, 1).contiguous()
    ).transpose(0, 1)


class VocabLogitsKLLoss(LogitsKLLoss):
    """ModelOpt's forward KL(teacher || student) on logits, over the real vocabulary only."""

    def __init__(self, model_config, vocab_size: int, temperature: float = 1.0):
        super().__init__(model_config, temperature=temperature)
        self._vocab_size = vocab_size

    def pre_forward(self, predictions, targets):
        predictions, targets = super().pre_forward(predictions, targets)
        return (mask_padded_vocab(predictions, self._vocab_size),
                mask_padded_vocab(targets, self._vocab_size))


def reduce_sum(loss_mask: torch.Tensor):
    """ModelOpt loss outputs -> masked sum over tokens (summed over TP ranks when the loss is a
    TP-partial sum, as LogitsKLLoss's is)."""

    def red(x):
        tp_reduce = False
        if isinstance(x, tuple):
            x, tp_reduce, _ = x
        total = (x.float() * loss_mask).sum()
        if tp_reduce:  # value of the full sum; gradients stay local (the softmax denominators
            # were all-reduced with autograd inside the loss), as Megatron-LM does
            torch.distributed.all_reduce(total, group=ps.get_tensor_model_parallel_group())
        return total

    return red
