"""The Triton kernels of recipes/lib/kd_tiles.py: its module docstring gives the algorithm and
`stats_torch` / `grad_torch` are their line-for-line mirrors in PyTorch. One program per token
row, looping over the row's vocabulary tiles; BLOCK lanes each keep their own running max and
sums (online softmax), reduced across lanes at the row's end. Imported only where Triton is
installed (kd_tiles.kernels)."""
from __future__ import annotations

import triton
import triton.language as tl


def compile_for(capability: int = 90, num_warps: int = 16) -> list[str]:
    """Compile every variant of both kernels for a CUDA GPU of `capability` (90: Hopper) down to
    its cubin, here, without a GPU (Triton's own ptxas): the compiler's checks, which Triton's
    interpreter does not run (tests/unit/test_kd_tiles.py). Returns the variants compiled."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415 - only this check needs it
    from triton.compiler import ASTSource  # noqa: PLC0415

    stats, grad = build()
    common = {"s_ptr": "*bf16", "t_ptr": "*bf16", "y_ptr": "*i64"}
    ints = {k: "i32" for k in ("v", "start", "vocab_size")}
    sig = {"stats": {**common, "out_ptr": "*fp32", "stride_s": "i32", "stride_t": "i32", **ints,
                     "inv_t": "fp32"},
           "grad": {**common, "lse_ptr": "*fp32", "gk_ptr": "*fp32", "gl_ptr": "*fp32",
                    "g_ptr": "*bf16", "stride_s": "i32", "stride_t": "i32", "stride_g": "i32",
                    **ints, "inv_t": "fp32"}}
    variants = [(stats, "stats", dict(HAS_T=t, HAS_Y=y, LM_APART=t and y))
                for t in (True, False) for y in (True, False)]
    variants += [(grad, "grad", dict(TRAIN_KL=k, TRAIN_LM=m)) for k, m in
                 ((True, True), (True, False), (False, True))]
    done = []
    for fn, name, flags in variants:
        constexprs = {**flags, "BLOCK": 2048}
        src = ASTSource(fn=fn, signature={**sig[name], **{k: "constexpr" for k in constexprs}},
                        constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": num_warps})
        assert kernel.asm.get("cubin"), f"{name} {flags}: no cubin"
        done.append(f"{name} {flags}")
    return done


def build():
    """(stats_kernel, grad_kernel), jitted now (each call: new kernels)."""
    return _stats(), _grad()


def _stats():
    """Pass 1: the row's 8 partial STATS (kd_tiles.stats_torch)."""

    @triton.jit
    def stats_kernel(s_ptr, t_ptr, y_ptr, out_ptr, stride_s, stride_t, v, start, vocab_size,
                     inv_t, HAS_T: tl.constexpr, HAS_Y: tl.constexpr, LM_APART: tl.constexpr,
                     BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        m_s = tl.full([BLOCK], -1.0e30, tl.float32)
        m_t = tl.full([BLOCK], -1.0e30, tl.float32)
        m_1 = tl.full([BLOCK], -1.0e30, tl.float32)
        z_s = tl.zeros([BLOCK], tl.float32)
        z_t = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        z_1 = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, v, BLOCK):
            cols = c0 + lanes
            valid = (cols < v) & (cols + start < vocab_size)
            xs = tl.load(s_ptr + row * stride_s + cols, mask=valid, other=0.0).to(tl.float32)
            a = xs * inv_t
            m_new = tl.maximum(m_s, tl.where(valid, a, -1.0e30))
            z_s = z_s * tl.exp(m_s - m_new) + tl.exp(tl.where(valid, a - m_new, float("-inf")))
            m_s = m_new
            if HAS_T:
                b = tl.load(t_ptr + row * stride_t + cols, mask=valid,
                            other=0.0).to(tl.float32) * inv_t
                m_new = tl.maximum(m_t, tl.where(valid, b, -1.0e30))
                rescale = tl.exp(m_t - m_new)
                e = tl.exp(tl.where(valid, b - m_new, float("-inf")))
                z_t = z_t * rescale + e
                acc = acc * rescale + e * (b - a)
                m_t = m_new
            if LM_APART:
                m_new = tl.maximum(m_1, tl.where(valid, xs, -1.0e30))
                z_1 = z_1 * tl.exp(m_1 - m_new) + tl.exp(tl.where(valid, xs - m_new, float("-inf")))
                m_1 = m_new
        out = out_ptr + row * 8
        top = tl.max(m_s, 0)
        tl.store(out, top)
        tl.store(out + 1, tl.sum(z_s * tl.exp(m_s - top), 0))
        top = tl.max(m_t, 0)
        tl.store(out + 2, top)
        tl.store(out + 3, tl.sum(z_t * tl.exp(m_t - top), 0))
        tl.store(out + 4, tl.sum(acc * tl.exp(m_t - top), 0))
        top = tl.max(m_1, 0)
        tl.store(out + 5, top)
        tl.store(out + 6, tl.sum(z_1 * tl.exp(m_1 - top), 0))
        if HAS_Y:
            local = tl.load(y_ptr + row) - start
            held = (local >= 0) & (local < v)
            picked = tl.load(s_ptr + row * stride_s + local, mask=held, other=0.0)
            tl.store(out + 7, picked.to(tl.float32))

    return stats_kernel


def _grad():
    """Pass 2: the row's gradient (kd_tiles.grad_torch)."""

    @triton.jit
    def grad_kernel(s_ptr, t_ptr, y_ptr, lse_ptr, gk_ptr, gl_ptr, g_ptr, stride_s, stride_t,
                    stride_g, v, start, vocab_size, inv_t, TRAIN_KL: tl.constexpr,
                    TRAIN_LM: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        lse_s = tl.load(lse_ptr + row * 3)
        lse_t = tl.load(lse_ptr + row * 3 + 1)
        lse_1 = tl.load(lse_ptr + row * 3 + 2)
        gk = tl.load(gk_ptr + row)
        gl = tl.load(gl_ptr + row)
        local = tl.load(y_ptr + row) - start
        for c0 in range(0, v, BLOCK):
            cols = c0 + lanes
            inside = cols < v
            valid = inside & (cols + start < vocab_size)
            xs = tl.load(s_ptr + row * stride_s + cols, mask=valid, other=0.0).to(tl.float32)
            g = tl.zeros([BLOCK], tl.float32)
            if TRAIN_KL:
                b = tl.load(t_ptr + row * stride_t + cols, mask=valid,
                            other=0.0).to(tl.float32) * inv_t
                g += gk * inv_t * (tl.exp(xs * inv_t - lse_s) - tl.exp(b - lse_t))
            if TRAIN_LM:
                g += gl * (tl.exp(xs - lse_1) - tl.where(cols == local, 1.0, 0.0))
            g = tl.where(valid, g, 0.0)
            tl.store(g_ptr + row * stride_g + cols, g.to(g_ptr.dtype.element_ty), mask=inside)

    return grad_kernel
