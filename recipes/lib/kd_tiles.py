"""The KD and LM losses in two passes over vocabulary tiles: a Triton kernel for the GPU, and
`tiles_torch`, a pure-torch mirror of the same tiling (the CPU's check of the kernel; a CPU
trains on kd.py's chunked path, which is faster there).

Per token row of the student's logits s and the teacher's t (v_local columns per tensor-parallel
rank, this rank's first column `start`, the whole vocabulary's first `vocab_size` columns real),
temperature T:

- pass 1, the forward: one read of s and t. Over tiles of BLOCK columns, each of the BLOCK lanes
  keeps a running max and a running sum of exp of s / T, of t / T and, for the LM loss, of s
  (T = 1), and the teacher-weighted sum of exp(t / T - m) (t - s) / T. The lanes are then
  reduced to one row of 8 floats: `STATS`. The label's logit s[y] comes from the rank holding
  its column.
- tensor parallelism: the maxima are all-reduced (MAX), the sums rescaled to them and all-reduced
  (SUM), two collectives of [rows, 3] and [rows, 5] floats. Then
  kl = acc / z_t - lse_t + lse_s and nll = lse_1 - s[y], the same on every rank.
- pass 2, the backward: one read of s and t and one write of the gradient, in the logits' dtype,
  zero on padded columns:
  g = g_kl (softmax(s / T) - softmax(t / T)) / T + g_nll (softmax(s) - onehot(y)).

No [tokens x vocab] fp32 temporary: ~10 bytes of memory traffic per bf16 logit, against ~100
for the chunked path's eager kernels. Both losses are differentiable in one pass, so KD with an
LM loss costs one pass. The price: s and t are kept until the backward (the chunked path keeps
the gradient instead), one [tokens x v_local] tensor in the logits' dtype more at the
backward's peak. tests/unit/test_kd_tiles.py holds the mirror against fp64 (and, where Triton
is installed, the kernel against the mirror in Triton's interpreter); tests/gpu on a GPU.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist

log = logging.getLogger("recipes.kd")

BLOCK = 2048  # vocabulary columns per tile, the lanes of a row: 63 tiles at Llama-3's 128k
WARPS = 16  # per row: ptxas for sm_90a gives pass 1 (seven fp32 accumulators per lane) 56
# registers a thread and no spills at 16 warps, 98 at 8 (not yet timed on a GPU)
NEG = -1.0e30  # a lane's max before its first real column: finite, so exp(NEG - NEG) is no NaN
STATS = ("m_s", "z_s", "m_t", "z_t", "acc", "m_1", "z_1", "s_y")  # pass 1's row, in order
MAXES, SUMS = (0, 2, 5), (1, 3, 4, 6, 7)  # the columns all-reduced by MAX, then by SUM


def block_for(v_local: int) -> int:
    """The tile width for `v_local` columns: BLOCK, or the power of two covering a smaller
    vocabulary (a Triton block is a power of two)."""
    return min(BLOCK, 1 << max(v_local - 1, 1).bit_length())


# ---- the pure-torch mirror: each tile as the kernel's lanes see it ------------------------
def _tile(x, c0: int, block: int, vocab_size: int, start: int):
    """Columns c0 .. c0 + block of x in fp32, and which are real (in x and the vocabulary);
    the others read 0, as the kernel's masked loads do."""
    part = x[:, c0:c0 + block].float()
    part = torch.nn.functional.pad(part, (0, block - part.shape[1]))
    cols = c0 + torch.arange(block, device=x.device)
    return part, cols, (cols < x.shape[1]) & (cols + start < vocab_size)


def _online(m, z, x, valid):
    """One tile into the lanes' running (max, sum of exp(x - max)): the kernel's update."""
    m_new = torch.maximum(m, torch.where(valid, x, NEG))
    return m_new, z * torch.exp(m - m_new) + _exp(x - m_new, valid)


def _exp(x, valid):
    """exp(x) on the real columns, 0 elsewhere (exp(-inf)), no inf computed and dropped."""
    return torch.exp(torch.where(valid, x, -torch.inf))


def _lanes(m, z):
    """A row's lanes -> (max, sum rescaled to it)."""
    top = m.max(-1).values
    return top, (z * torch.exp(m - top[:, None])).sum(-1)


def stats_torch(s, t, y, start: int, vocab_size: int, inv_t: float, lm_apart: bool,
                block: int) -> torch.Tensor:
    """Pass 1 on [n, v_local] logits (t and y may be None): [n, 8] fp32 partial `STATS`,
    lane for lane and tile for tile as the kernel computes them."""
    n, v = s.shape
    full = lambda value: torch.full((n, block), value, device=s.device)  # noqa: E731
    m_s, m_t, m_1 = full(NEG), full(NEG), full(NEG)
    z_s, z_t, acc, z_1 = full(0.0), full(0.0), full(0.0), full(0.0)
    for c0 in range(0, v, block):
        xs, _, valid = _tile(s, c0, block, vocab_size, start)
        a = xs * inv_t
        m_s, z_s = _online(m_s, z_s, a, valid)
        if t is not None:
            b = _tile(t, c0, block, vocab_size, start)[0] * inv_t
            m_new = torch.maximum(m_t, torch.where(valid, b, NEG))
            rescale, e = torch.exp(m_t - m_new), _exp(b - m_new, valid)
            z_t, acc, m_t = z_t * rescale + e, acc * rescale + e * (b - a), m_new
        if lm_apart:
            m_1, z_1 = _online(m_1, z_1, xs, valid)
    out = torch.zeros(n, len(STATS), device=s.device)
    out[:, 0], out[:, 1] = _lanes(m_s, z_s)
    out[:, 2], out[:, 3] = _lanes(m_t, z_t)
    out[:, 4] = (acc * torch.exp(m_t - out[:, 2:3])).sum(-1)
    out[:, 5], out[:, 6] = _lanes(m_1, z_1)
    if y is not None:
        local = y - start
        held = (local >= 0) & (local < v)
        picked = s.gather(1, local.clamp(0, v - 1)[:, None]).squeeze(1).float()
        out[:, 7] = torch.where(held, picked, 0.0)
    return out


def grad_torch(s, t, y, lse, g_kl, g_nll, start: int, vocab_size: int, inv_t: float,
               block: int) -> torch.Tensor:
    """Pass 2: the gradient [n, v_local] in s's dtype from the rows' log-sum-exps `lse` [n, 3]
    (of s / T, t / T and s) and the per-row output gradients (None: that loss is not trained),
    tile for tile as the kernel writes it."""
    n, v = s.shape
    grad = torch.empty_like(s)
    for c0 in range(0, v, block):
        xs, cols, valid = _tile(s, c0, block, vocab_size, start)
        g = torch.zeros(n, block, device=s.device)
        if g_kl is not None:
            b = _tile(t, c0, block, vocab_size, start)[0] * inv_t
            g += g_kl[:, None] * inv_t * (torch.exp(xs * inv_t - lse[:, 0:1])
                                         - torch.exp(b - lse[:, 1:2]))
        if g_nll is not None:
            g += g_nll[:, None] * (torch.exp(xs - lse[:, 2:3])
                                   - (cols == (y - start)[:, None]).float())
        width = min(block, v - c0)
        grad[:, c0:c0 + width] = torch.where(valid, g, 0.0)[:, :width]
    return grad


# ---- the Triton kernels (recipes/lib/kd_triton.py), built on first use ---------------------
def triton_ready() -> bool:
    """Whether Triton is installed (PyTorch's CUDA wheels bring it)."""
    try:
        import triton  # noqa: F401 - only probing
    except ImportError:
        return False
    return True


def kernel_works(device: str) -> bool:
    """Whether the Triton kernel compiles and runs on `device` and agrees with the torch mirror
    on a small problem (both losses trained, T = 2, bf16 logits, a padded vocabulary over two
    tiles): what training asks once per process (kd.py caches it) before it trusts the kernel.
    On any failure: False, and a
    warning with the reason; the caller then takes the chunked losses (the same values)."""
    if not triton_ready():
        return False
    g = torch.Generator(device=device).manual_seed(0)
    s = (torch.randn(8, 2176, device=device, generator=g) * 3).bfloat16()
    t = (torch.randn(8, 2176, device=device, generator=g) * 3).bfloat16()
    y = torch.randint(0, 2100, (8,), device=device, generator=g)

    def losses_and_grad(impl):  # with a graph even where the first caller runs without one
        with torch.inference_mode(False), torch.enable_grad():
            x = s.clone().requires_grad_()
            kl, nll = tiled_losses(x, t, y, 2100, 2.0, impl=impl)
            (kl.sum() + 0.5 * nll.sum()).backward()
        return kl.detach(), nll.detach(), x.grad

    try:
        got, want = losses_and_grad("triton"), losses_and_grad("torch")
        ok = all(torch.allclose(a.float(), b.float(), rtol=2 ** -7, atol=1e-4)
                 for a, b in zip(got, want))
        why = "its losses or gradient differ from the torch mirror's"
    except Exception as e:  # noqa: BLE001 - any failure of the kernel here means: not used
        ok, why = False, f"{type(e).__name__}: {e}"
    if not ok:
        log.warning("the Triton KD-loss kernel is not used on %s (%s); the chunked losses are "
                    "(the same values, more memory traffic)", device, why)
    return ok


@functools.cache
def kernels():
    """(stats, grad) Triton kernels. Under TRITON_INTERPRET=1, set before Triton is first
    imported (Triton reads it then), Triton's CPU interpreter runs them (make test-triton).
    Imported here, so that a host without Triton imports this module."""
    from recipes.lib import kd_triton  # noqa: PLC0415 - imports triton

    return kd_triton.build()


def _stats(impl: str, s, t, y, start, vocab_size, inv_t, lm_apart):
    n, v = s.shape
    block = block_for(v)
    if impl == "torch":
        return stats_torch(s, t, y, start, vocab_size, inv_t, lm_apart, block)
    out = torch.zeros(n, len(STATS), dtype=torch.float32, device=s.device)
    t_ = s if t is None else t
    y_ = torch.zeros(1, dtype=torch.int64, device=s.device) if y is None else y
    kernels()[0][(n,)](
        s, t_, y_, out, s.stride(0), t_.stride(0), v, start, vocab_size, inv_t,
        HAS_T=t is not None, HAS_Y=y is not None, LM_APART=lm_apart, BLOCK=block,
        num_warps=WARPS)
    return out


def _grad(impl: str, s, t, y, lse, g_kl, g_nll, start, vocab_size, inv_t):
    n, v = s.shape
    block = block_for(v)
    if impl == "torch":
        return grad_torch(s, t, y, lse, g_kl, g_nll, start, vocab_size, inv_t, block)
    grad = torch.empty_like(s)
    zeros = torch.zeros(n, dtype=torch.float32, device=s.device)
    t_ = s if t is None else t
    y_ = torch.zeros(n, dtype=torch.int64, device=s.device) if y is None else y
    kernels()[1][(n,)](
        s, t_, y_, lse, zeros if g_kl is None else g_kl, zeros if g_nll is None else g_nll,
        grad, s.stride(0), t_.stride(0), grad.stride(0), v, start, vocab_size, inv_t,
        TRAIN_KL=g_kl is not None, TRAIN_LM=g_nll is not None, BLOCK=block, num_warps=WARPS)
    return grad


# ---- the tensor-parallel reduction and the autograd function -------------------------------
def combine(stats: torch.Tensor, group, lm_apart: bool):
    """Partial [n, 8] `STATS` of each rank's columns -> (lse [n, 3] of s / T, t / T and s;
    acc / z_t; s[y]) over the whole vocabulary: the maxima all-reduced, the sums rescaled to
    them and all-reduced. A rank whose columns are all padding holds max NEG and sums 0."""
    stats = stats.clone()
    if group is not None and dist.get_world_size(group) > 1:
        top = stats[:, MAXES].contiguous()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        scale = torch.exp(stats[:, MAXES] - top)
        stats[:, 1] *= scale[:, 0]
        stats[:, 3] *= scale[:, 1]
        stats[:, 4] *= scale[:, 1]
        stats[:, 6] *= scale[:, 2]
        stats[:, MAXES] = top
        sums = stats[:, SUMS].contiguous()
        dist.all_reduce(sums, group=group)
        stats[:, SUMS] = sums
    if not lm_apart:  # T = 1 or no labels: the LM loss's softmax is the student's own
        stats[:, 5:7] = stats[:, 0:2]
    lse = stats[:, [0, 2, 5]] + torch.log(stats[:, [1, 3, 6]])
    return lse, stats[:, 4] / stats[:, 3], stats[:, 7]


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """[..., width] -> [n, width] rows of unit column stride (a view where it can be)."""
    x = x.reshape(-1, width)
    return x if x.stride(1) == 1 else x.contiguous()


class _TiledLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, teacher, labels, vocab_size, temperature, start, group, impl):
        v = logits.shape[-1]
        s = _rows(logits.detach(), v)
        t = None if teacher is None else _rows(teacher.detach(), teacher.shape[-1])
        y = None if labels is None else labels.reshape(-1)
        inv_t = 1.0 if t is None else 1.0 / temperature
        lm_apart = y is not None and t is not None and temperature != 1.0
        stats = _stats(impl, s, t, y, start, vocab_size, inv_t, lm_apart)
        lse, weighted, s_y = combine(stats, group, lm_apart)
        zeros = torch.zeros_like(s_y)
        kl = zeros if t is None else weighted - lse[:, 1] + lse[:, 0]
        nll = zeros if y is None else lse[:, 2] - s_y
        ctx.save_for_backward(s, t, y, lse)
        ctx.args = (start, vocab_size, inv_t, impl, logits.shape)
        ctx.set_materialize_grads(False)
        shape = logits.shape[:-1]
        return kl.view(shape), nll.clone().view(shape)

    @staticmethod
    def backward(ctx, g_kl, g_nll):
        s, t, y, lse = ctx.saved_tensors
        start, vocab_size, inv_t, impl, shape = ctx.args
        g_kl = None if g_kl is None or t is None else g_kl.reshape(-1).float().contiguous()
        g_nll = None if g_nll is None or y is None else g_nll.reshape(-1).float().contiguous()
        grad = None
        if g_kl is not None or g_nll is not None:
            grad = _grad(impl, s, t, y, lse, g_kl, g_nll, start, vocab_size,
                         inv_t).view(shape)
        return grad, None, None, None, None, None, None, None


def tiled_losses(logits, teacher, labels, vocab_size: int, temperature: float = 1.0,
                 start: int = 0, group=None, impl: str | None = None):
    """Per-token (KL(teacher || student) at `temperature`, student NLL at T = 1), each [...] as
    logits[..., 0], from vocab-parallel logits [..., v_local] whose first column is the
    vocabulary's column `start` (TP rank x v_local), the first `vocab_size` real, reduced over
    `group` (None: one rank). `teacher` may be None (kl = 0) and so may `labels` (nll = 0);
    both losses are differentiable, every TP rank gets the full values and its own columns'
    gradient. At one rank the teacher may be wider or narrower than the student (only the
    first `vocab_size` columns are read). `impl`: "triton" (the default on a GPU with Triton;
    on a CPU only under Triton's interpreter) or "torch" (the mirror, the default elsewhere)."""
    if impl is None:
        impl = "triton" if logits.is_cuda and triton_ready() else "torch"
    return _TiledLosses.apply(logits, teacher, labels, vocab_size, temperature, start, group,
                              impl)
