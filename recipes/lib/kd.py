"""Losses over the real vocabulary. Megatron pads the vocab (to a multiple of 128); the padded
logits are not the model's and must not enter a softmax: both the KD loss and the LM loss mask
them to a large negative value, out of place (a new tensor), which also keeps megatron's
vocab-parallel cross-entropy, which works in place on fp32 logits, away from the logits ModelOpt
captured for the KD loss (without the copy, computing the LM loss in the same step silently
changed the KL: 5.35 instead of 0.49 in tests/stages/test_distill.py's KD = KL check).

On a GPU with Triton, both losses are computed by the two-pass vocabulary-tile kernel of
recipes/lib/kd_tiles.py at any TP (`loss_path` "tiles"): no [tokens x vocab] fp32 temporary, the
KL and the NLL in one pass, the maxima and sums all-reduced over the TP ranks. Elsewhere, at
TP=1 ("chunks"), by one chunked function (`token_losses`): the same KL(teacher || student) as
ModelOpt's LogitsKLLoss and the same cross-entropy, over the first `vocab_size` columns,
`chunk_rows` tokens at a time, with the gradient formed during the forward (softmax(student) -
softmax(teacher), or softmax - onehot) and kept in the logits' dtype. The unfused path
materialises about ten fp32 copies of the [tokens x vocab] logits per micro-batch (casts, the
temperature division, masking, two log-softmaxes and their saved outputs, the KL's exp/sub/mul,
the LM loss's own copies): on a CPU they cost more than the student's forward, on a GPU ~40 GB at
seq 8192 and Llama-3's 128k vocabulary, more than the student's activations. In distillation
the fused KL also yields the student's per-token NLL for the log at no cost.
tests/unit/test_kd.py checks equal losses and gradients against the unfused path (FUSED =
False), for the chunks and the tiles (TILES = True: the tiles' pure-torch mirror on a CPU).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from recipes.lib import compat, kd_tiles, train
from recipes.lib.train_config import KDConfig

compat.importable()  # megatron's import needs triton or its stand-in; apply() at use
import modelopt.torch.distill as mtd  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from modelopt.torch.distill.plugins import megatron as mkd  # noqa: E402
from modelopt.torch.distill.plugins.megatron import LogitsKLLoss  # noqa: E402

NEG = -1.0e9  # finite: exp() underflows to 0 and kl_div stays NaN-free
FUSED = True  # False: ModelOpt's LogitsKLLoss and megatron's cross-entropy (tests compare)
# the tile losses: None, on a GPU with Triton; MINITRON_KD_TILES=0 turns them off there (the
# chunks, or ModelOpt's loss at TP>1), =1 turns them on anywhere (on a CPU the slow torch mirror:
# tests)
TILES: bool | None = {"0": False, "1": True}.get(os.environ.get("MINITRON_KD_TILES", ""))
CHUNK_TOKENS = 16  # rows per chunk of the fused losses on a CPU: ~3 MB of fp32 at a 49k
# vocabulary, so the ~8 passes over a chunk hit the cache (docs/measured.md)
GPU_CHUNK_BYTES = 256 << 20  # fp32 bytes per temporary per chunk on a GPU: 523 rows at a 128k
# vocabulary, few kernel launches, and a few such temporaries live at a time


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, copy: bool = False) -> torch.Tensor:
    """Vocab-parallel `logits` [..., v_local] with the entries past `vocab_size` set to NEG (a
    new tensor); where nothing is padded, `logits` itself, or a copy with `copy`."""
    v_local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * v_local
    pad = torch.arange(start, start + v_local, device=logits.device) >= vocab_size
    if pad.any():
        return logits.masked_fill(pad, NEG)
    return logits.clone() if copy else logits


def loss_path(device: torch.device) -> str | None:
    """How the losses on `device` are computed: "tiles" (kd_tiles, any TP), "chunks"
    (`token_losses`, TP=1), or None (ModelOpt's LogitsKLLoss and megatron's cross-entropy)."""
    if not FUSED:
        return None
    tiles = TILES if TILES is not None else device.type == "cuda" and _kernel_works(str(device))
    if tiles:
        return "tiles"
    return "chunks" if ps.get_tensor_model_parallel_world_size() == 1 else None


@functools.cache
def _kernel_works(device: str) -> bool:
    """kd_tiles.kernel_works, agreed by every TP rank (MIN over the group): the ranks of a
    vocabulary must take the same path, whose collectives differ."""
    ok = kd_tiles.kernel_works(device)
    if ps.get_tensor_model_parallel_world_size() > 1:
        flag = torch.tensor([int(ok)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN,
                                     group=ps.get_tensor_model_parallel_group())
        ok = bool(flag.item())
    return ok


def tiles(logits, teacher, labels, vocab_size: int, temperature: float = 1.0):
    """kd_tiles.tiled_losses on this rank's vocab-parallel columns and the TP group."""
    return kd_tiles.tiled_losses(
        logits, teacher, labels, vocab_size, temperature,
        start=ps.get_tensor_model_parallel_rank() * logits.shape[-1],
        group=ps.get_tensor_model_parallel_group())


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Tokens per chunk of the fused losses: cache-sized on a CPU, GPU_CHUNK_BYTES on a GPU."""
    if device.type == "cpu":
        return CHUNK_TOKENS
    return max(CHUNK_TOKENS, GPU_CHUNK_BYTES // (4 * vocab))


class _TokenLosses(torch.autograd.Function):
    """(kl, nll) per token of [..., V] logits over the first `vocab` columns; the gradient of
    the trained one (kl when a teacher is given, else nll) is formed in the forward."""

    @staticmethod
    def forward(ctx, logits, teacher, labels, vocab: int, temperature: float):
        shape = logits.shape[:-1]
        x = logits.detach().reshape(-1, logits.shape[-1])
        t = None if teacher is None else teacher.detach().reshape(-1, teacher.shape[-1])
        y = None if labels is None else labels.reshape(-1)
        n = x.shape[0]
        kl = torch.zeros(n, dtype=torch.float32, device=x.device)
        nll = torch.zeros(n, dtype=torch.float32, device=x.device)
        grad = torch.empty_like(x)
        grad[:, vocab:] = 0  # padded columns: no gradient, as masking gives
        rows = ctx.rows = chunk_rows(vocab, x.device)
        for i in range(0, n, rows):
            j = min(i + rows, n)
            s = x[i:j, :vocab].float()
            ls = torch.log_softmax(s, -1)
            if y is not None:
                nll[i:j] = -ls.gather(1, y[i:j, None]).squeeze(1)
            if t is None:  # d nll / d logits = softmax - onehot
                g = ls.exp_()
                g[torch.arange(j - i, device=g.device), y[i:j]] -= 1.0
            else:  # d KL / d logits = (softmax(s / T) - softmax(t / T)) / T
                tt = t[i:j, :vocab].float()
                if temperature != 1.0:  # not in place: in fp32 s and tt are the callers' logits
                    ls = torch.log_softmax(s / temperature, -1)
                    tt = tt / temperature
                lt = torch.log_softmax(tt, -1)
                pt = lt.exp()
                kl[i:j] = (pt * (lt - ls)).sum(-1)
                g = ls.exp_().sub_(pt)
                if temperature != 1.0:
                    g.div_(temperature)
            grad[i:j, :vocab] = g
        ctx.save_for_backward(grad)
        ctx.kd = t is not None
        ctx.logits_shape = logits.shape
        ctx.mark_non_differentiable(nll if ctx.kd else kl)
        return kl.view(shape), nll.view(shape)

    @staticmethod
    def backward(ctx, g_kl, g_nll):
        (grad,) = ctx.saved_tensors
        g = (g_kl if ctx.kd else g_nll).reshape(-1, 1).float()
        rows = ctx.rows  # in place, by chunks: on a CPU 10x faster than one mul_
        for i in range(0, grad.shape[0], rows):
            grad[i:i + rows].mul_(g[i:i + rows])
        return grad.view(ctx.logits_shape), None, None, None, None


def token_losses(logits, teacher, labels, vocab_size: int, temperature: float = 1.0):
    """Fused per-token (KL(teacher || student), student NLL), each [...] as logits[..., 0]
    (TP=1). With a teacher the KL is differentiable and the NLL (zeros without labels) is
    not; without one the NLL is."""
    return _TokenLosses.apply(logits, teacher, labels, vocab_size, temperature)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token next-token cross-entropy [...] from vocab-parallel logits [..., v_local] and
    labels [...] in the same layout ([s, b] in training, train.forward_steps)."""
    path = loss_path(logits.device)
    if path == "tiles":
        return tiles(logits, None, labels, vocab_size)[1]
    if path == "chunks":
        return token_losses(logits, None, labels, vocab_size)[1]
    # megatron's cross-entropy works in place on fp32 logits: never on the ones KD reads (a
    # bf16 tensor's .float() is a copy already)
    masked = mask_padded_vocab(logits, vocab_size, copy=logits.dtype == torch.float32).float()
    return tensor_parallel.vocab_parallel_cross_entropy(masked, labels)


def masked_lm_loss(output: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                   vocab_size: int) -> torch.Tensor:
    """The summed LM loss of a training step (train.forward_steps): logits [s, b, v] as the
    output layer computed them, labels and loss mask [b, s] as the batch holds them."""
    return (lm_loss(output, labels.t().contiguous(), vocab_size) * mask.t()).sum()


class VocabLogitsKLLoss(LogitsKLLoss):
    """ModelOpt's forward KL(teacher || student) on logits, over the first `vocab_size` columns
    (the real vocabulary, or the one a teacher and student of different padded vocabularies
    share; the wider side's extra columns are cut off, TP=1). Fused path: set `labels` ([b, s])
    before ModelOpt calls the loss and read the student's per-token NLL [b, s] (detached) from
    `nll` afterwards."""

    def __init__(self, model_config, vocab_size: int, temperature: float = 1.0):
        super().__init__(model_config, temperature=temperature)
        self._vocab_size = vocab_size
        self.labels: torch.Tensor | None = None
        self.nll: torch.Tensor | None = None

    def pre_forward(self, predictions, targets):
        predictions, targets = super().pre_forward(predictions, targets)
        width = min(predictions.shape[-1], targets.shape[-1])  # differently padded vocabularies
        return (mask_padded_vocab(predictions[..., :width], self._vocab_size),
                mask_padded_vocab(targets[..., :width], self._vocab_size))

    def forward(self, predictions, targets):
        labels, self.labels, self.nll = self.labels, None, None
        # ModelOpt's own pre_forward (tuple unpacking, teacher detached), without our masking
        student, teacher = LogitsKLLoss.pre_forward(self, predictions, targets)
        path = loss_path(student.device)
        if path == "tiles" and ps.get_tensor_model_parallel_world_size() > 1 and \
                student.shape[-1] != teacher.shape[-1]:
            path = None  # vocab-parallel shards of differently padded vocabularies misalign
        if path is None:
            return super().forward(predictions, targets)
        labels = None if labels is None else labels.transpose(0, 1)  # logits are [s, b, v]
        losses = tiles if path == "tiles" else token_losses
        kl, nll = losses(student, teacher, labels, self._vocab_size, self._temperature)
        self.nll = nll.detach().transpose(0, 1) if labels is not None else None
        # the tiles' KL is the whole vocabulary's on every TP rank; the chunks' is TP=1's
        return self.post_forward(kl, tp_reduce=path == "chunks")


def reduce_sum(loss_mask: torch.Tensor):
    """ModelOpt loss outputs -> masked sum over tokens (summed over TP ranks when the loss is a
    TP-partial sum, as LogitsKLLoss's is)."""

    def red(x):
        tp_reduce = False
        if isinstance(x, tuple):
            x, tp_reduce, _ = x
        total = (x.float() * loss_mask).sum()
        if tp_reduce:  # value of the full sum; gradients stay local (the softmax denominators
            # were all-reduced with autograd inside the loss), as Megatron-LM does: reduce a
            # detached copy, so autograd never runs through the collective
            full = total.detach().clone()
            torch.distributed.all_reduce(full, group=ps.get_tensor_model_parallel_group())
            total = total + (full - total.detach())
        return total

    return red


# ---- the distillation model (distill, and prune's tournament) ------------------------------
def distillation_model(student, teacher, c: KDConfig, vocab_size: int):
    """Wrap the student as ModelOpt's DistillationModel (teacher inside, frozen) with `c`'s KD
    settings, the logit KL over the first `vocab_size` columns. Returns it and the logit
    criterion (None on pipeline stages without the output layer)."""
    dcfg = mkd.setup_distillation_config(mkd.DistillationConfig(
        intermediate_layer_pairs=[tuple(p) for p in c.intermediate_layer_pairs or []],
        skip_lm_loss=c.skip_lm_loss, kd_loss_scale=c.kd_loss_scale,
        logit_kl_temperature=c.kd_temperature), student.config, teacher.config)
    kl = None
    if dcfg.criterion:  # last stage: the logit loss over the real vocabulary
        kl = VocabLogitsKLLoss(student.config, vocab_size, c.kd_temperature)
        dcfg.criterion[tuple(dcfg.logit_layers)] = kl
    model = mtd.convert(student, mode=[("kd_loss", {
        "teacher_model": teacher, "criterion": dcfg.criterion,
        "loss_balancer": dcfg.loss_balancer})])
    mkd.adjust_distillation_model_for_mcore(model, dcfg)
    return model, kl


def make_step_fn(model, kl, vocab_size: int, skip_lm_loss: bool, intermediate: bool,
                 kd_vocab: int | None = None):
    """forward_step_func maker for megatron's schedule (train.forward_steps). Labels are never
    passed to the model: the LM loss (over the student's `vocab_size`) is computed here on a
    masked copy of the logits (see recipes/lib/kd.py), without a graph when it is only logged,
    or, when only logged and the losses are fused over the same columns, by the KL criterion
    `kl` in the same pass."""

    def loss_func(labels, mask, output):
        n = mask.sum()
        lm_from_kl = skip_lm_loss and loss_path(output.device) is not None and \
            kd_vocab in (None, vocab_size)
        if lm_from_kl:
            kl.labels = labels
            student_loss = torch.zeros((), device=output.device)  # ignored: skip_lm_loss
        else:  # only logged (skip_lm_loss): no graph, and no memory kept for one
            with torch.no_grad() if skip_lm_loss else contextlib.nullcontext():
                lm_sum = masked_lm_loss(output, labels, mask, vocab_size)
            student_loss = lm_sum
        losses = model.compute_kd_loss(student_loss=student_loss,
                                       loss_reduction_fn=reduce_sum(mask))
        if lm_from_kl:  # (None where the criterion fell back to ModelOpt's own loss)
            lm_sum = (kl.nll * mask).sum() if kl.nll is not None else \
                masked_lm_loss(output.detach(), labels, mask, vocab_size)
        total = losses["kd_loss"]
        report = {"loss": torch.stack([total.detach(), n]),
                  "kd_loss": torch.stack([losses["logits_loss"].detach(), n]),
                  "lm_loss": torch.stack([lm_sum.detach(), n])}
        if intermediate:
            report["intermediate_loss"] = torch.stack(
                [losses["intermediate_loss"].detach().float(), n])
        return total, n.int(), report

    return train.forward_steps(loss_func)


def schedule_kwargs(c: KDConfig):
    """`schedule_kwargs(ddp)` for train.train: under pipeline parallelism ModelOpt sends the
    teacher's activations beside the student's between stages, so megatron's schedule must
    size its send / receive buffers for both (ModelOpt's tensor-shape adjustment)."""
    def build(ddp) -> dict:
        fn = mkd.get_tensor_shapes_adjust_fn_for_distillation(
            ddp, seq_length=c.seq_length, micro_batch_size=c.micro_batch_size,
            decoder_seq_length=c.seq_length)
        return {} if fn is None else {"adjust_tensor_shapes_fn": fn}

    return build
