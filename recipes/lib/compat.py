"""CPU compatibility for megatron-core 0.19.2 and nvidia-modelopt 0.47.0, and the one patch of
megatron that applies on a GPU too (`logits_as_computed`). Patches of upstream code live in
three modules, each saying why: this one, recipes/lib/modelopt_local.py (ModelOpt's pruning for
the local layer spec, on any device) and recipes/lib/harness.py (lm-evaluation-harness offline).

Here `apply()` applies everything, once: the import stand-ins where an optional GPU package is
missing, `GPTModel._postprocess` everywhere, the rest only without CUDA. It runs where megatron
is first needed (a stage's process groups, runtime.init; the modules that import megatron at
their top call it first: megatron's own import needs the triton stand-in), after checking what
the patches were written for (recipes/lib/upstream.py: the releases, and the parameters the
positional wrappers read). Delete an entry when the pinned upstream release no longer needs it.

Mechanism 1: upstream modules that hard-code CUDA (``device='cuda'``,
``torch.cuda.current_device()``, ``torch.cuda.synchronize()``) get their module-global ``torch``
replaced by `_CpuTorch`, a thin proxy that forwards everything to the real ``torch`` but maps
CUDA device requests to the CPU. The patch is scoped to those modules; ``torch`` itself is
untouched for everyone else.

Mechanism 2: upstream methods that call `tensor.cuda()` run with `Tensor.cuda` returning the
tensor itself, for the duration of that call only (`CUDA_TENSOR_METHODS`). Mechanism 3: code
that dispatches on `tensor.type()` being 'torch.cuda.FloatTensor' (BFloat16, Half) runs with CPU
float tensors reporting those names, during that call only (`CUDA_TYPE_CHECKING_CALLS`).

Mechanism 4: where Transformer Engine or apex is installed but CUDA is not (the NVIDIA container
on a CPU machine), megatron's optimizer modules get the module globals their own ImportError
branches set without them (`_no_fused_optimizer`): their fused Adam and multi-tensor kernels
allocate on CUDA ("Found no NVIDIA driver" when the optimizer is built).

Mechanism 5: megatron's activation recompute (`tensor_parallel.random.CheckpointFunction`)
saves and restores the CUDA generator's state around each recomputed layer; a CPU has none, so
there `_get_cuda_rng_state` gives None and `_set_cuda_rng_state` does nothing (`NO_CUDA_RNG`).
The CPU generator and the RNG tracker are saved and restored as before.

Besides these, CPU-only fast paths (`FAST_PATHS`): a slow upstream CPU fallback done faster,
only without CUDA, tested for equal results against the path it replaces.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
import types

import torch

from recipes.lib import cpu_linear, upstream
from recipes.lib.errors import BadState

_APPLIED = False


# upstream module -> why it is patched (the proxy fixes all of these the same way)
CUDA_HARDCODED_MODULES = {
    # torch.cuda.current_device() when building and when first applying rotary embeddings
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "current_device()",
    # GlobalMemoryBuffer.get_tensor: device=torch.cuda.current_device() (core attention scratch)
    "megatron.core.utils": "current_device()",
    # get_default_causal_mask: torch.ones(sq, sq, device="cuda")
    "megatron.core.transformer.utils": "device='cuda' causal mask",
    # gathers/scatters/p2p receive buffers: device=torch.cuda.current_device()
    "megatron.core.tensor_parallel.mappings": "current_device() buffers",
    "megatron.core.tensor_parallel.layers": "current_device() params/buffers",
    "megatron.core.tensor_parallel.data": "current_device() broadcast buffers",
    "megatron.core.tensor_parallel.utils": "current_device() buffers",
    "megatron.core.pipeline_parallel.p2p_communication": "current_device(), synchronize()",
    "megatron.core.parallel_state": "current_device(), synchronize()",
    "megatron.core.transformer.attention": "current_device() buffers",
    "megatron.core.transformer.module": "current_device()",
    "megatron.core.transformer.transformer_layer": "current_device()",
    "megatron.core.models.gpt.gpt_model": "current_device()",
    # DDP grad buffers and the distributed optimizer's shard buffers
    "megatron.core.distributed.param_and_grad_buffer": "current_device() buffers",
    "megatron.core.distributed.distributed_data_parallel": "current_device(), synchronize()",
    "megatron.core.optimizer.distrib_optimizer": "current_device() buffers",
    # found_inf / _scale_one / flag tensors created with device='cuda'
    "megatron.core.optimizer.optimizer": "device='cuda' buffers",
    # total_num_tokens = torch.zeros(..., device="cuda") in every schedule
    "megatron.core.pipeline_parallel.schedules": "device='cuda' token counter",
    # norm accumulators created with device='cuda'
    "megatron.core.optimizer.clip_grads": "device='cuda' norm buffers",
    # verify/finalize flags: device='cuda' and device=torch.cuda.current_device()
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "device='cuda' flags",
    "megatron.core.dist_checkpointing.strategies.async_utils": "current_device() flags",
    # empty/empty_like(device="cuda") buffers when shards are exchanged between ranks
    "megatron.core.dist_checkpointing.exchange_utils": "device='cuda' buffers",
    # torch.cuda.synchronize() before writing a checkpoint
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "cuda.synchronize()",
    # MoE: the router moves its weight to torch.cuda.current_device() on every gating call
    "megatron.core.transformer.moe.router": "current_device() router weight",
}


def _no_fused_optimizer() -> dict:
    """Module -> the globals megatron's own ImportError branches give it without TE and apex."""
    from megatron.core.utils import (  # lazy: megatron is imported in apply()
        local_multi_tensor_applier, local_multi_tensor_l2_norm, local_multi_tensor_scale)
    return {
        # optimizer/__init__.py: `from transformer_engine.pytorch.optimizers import FusedAdam`
        "megatron.core.optimizer": {"Adam": torch.optim.AdamW, "SGD": torch.optim.SGD,
                                    "USING_PYTORCH_OPTIMIZER": True},
        # optimizer/distrib_optimizer.py: the same, and HAVE_APEX_OR_TE for torch Adam's state
        "megatron.core.optimizer.distrib_optimizer": {
            "Adam": torch.optim.Adam, "HAVE_APEX_OR_TE": False, "USING_TE_OPTIMIZER": False,
            "USING_APEX_OPTIMIZER": False},
        # optimizer/optimizer.py: TE's multi_tensor_applier / multi_tensor_scale
        "megatron.core.optimizer.optimizer": {"multi_tensor_applier": local_multi_tensor_applier,
                                              "multi_tensor_scale_impl": local_multi_tensor_scale},
        # optimizer/clip_grads.py: the same and multi_tensor_l2norm
        "megatron.core.optimizer.clip_grads": {
            "multi_tensor_applier": local_multi_tensor_applier,
            "l2_norm_impl": local_multi_tensor_l2_norm,
            "multi_tensor_scale_impl": local_multi_tensor_scale,
            "multi_tensor_scale_tensor_impl": None},
    }


def use_unfused_optimizer() -> None:
    """Mechanism 4: megatron's optimizer modules as megatron leaves them without TE and apex."""
    for mod_name, values in _no_fused_optimizer().items():
        mod = importlib.import_module(mod_name)
        for name, value in values.items():
            setattr(mod, name, value)


# (module, class or None for a module-level function, name) whose body calls tensor.cuda()
CUDA_TENSOR_METHODS = [
    # LanguageModule.setup_embeddings_and_output_layer: `weight.data.cuda()` before the all-reduce
    # that ties input and output embeddings across pipeline stages (tied models at PP>1)
    ("megatron.core.models.common.language_module.language_module", "LanguageModule",
     "setup_embeddings_and_output_layer"),
]


# (module, class or None, name): bodies that check tensor.type() against CUDA type names
CUDA_TYPE_CHECKING_CALLS = [
    # clip_grad_by_total_norm_fp32 asserts fp32 CUDA grads; bound in clip_grads and imported by
    # name into optimizer
    ("megatron.core.optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", None, "clip_grad_by_total_norm_fp32"),
    # the bf16 optimizer sorts its params into bf16 / fp32 groups by CUDA type name
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    # the distributed optimizer (optimizer=distributed, DP=1 on a CPU) checks the same names
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
     "_build_model_and_main_param_groups"),
]
# module -> its functions that read or set the CUDA generator's state (mechanism 5)
NO_CUDA_RNG = {"megatron.core.tensor_parallel.random": {
    "_get_cuda_rng_state": lambda *_a, **_k: None,
    "_set_cuda_rng_state": lambda *_a, **_k: None}}
_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor",
                    torch.float16: "torch.cuda.HalfTensor"}


def _cpu_device(device):
    if device == "cuda" or (isinstance(device, str) and device.startswith("cuda")):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CpuCuda(types.SimpleNamespace):
    """Stands in for ``torch.cuda`` inside a patched module."""

    def __getattr__(self, name):  # everything not overridden comes from the real torch.cuda
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*_args, **_kwargs):
        return None

    @staticmethod
    def empty_cache():
        return None

    class _Stream:
        """CPU work is synchronous: waiting on a stream or event is a no-op."""

        def wait_event(self, *_a, **_k):
            return None

        def wait_stream(self, *_a, **_k):
            return None

    @staticmethod
    def current_stream(*_a, **_k):
        return _CpuCuda._Stream()

    @staticmethod
    def stream(*_a, **_k):
        return contextlib.nullcontext()


class _CpuTorch(types.ModuleType):
    """Stands in for ``torch`` inside a patched module: CUDA device requests become CPU."""

    cuda = _CpuCuda()

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in {"tensor", "zeros", "ones", "empty", "empty_like", "full", "arange", "randn",
                    "rand"}:
            def factory(*args, _fn=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return _fn(*args, **kwargs)

            return factory
        return attr


def importable() -> None:
    """Make megatron-core importable here, patching nothing else (what a module that imports
    megatron at its top calls first; `apply()` does the rest where megatron is first used):
    megatron/core/transformer/moe/ops/paged_stash.py imports triton at import time for MoE
    paged-stash kernels a dense model never runs. Without triton (a 286 MB wheel, CPU-useless),
    register a stand-in whose kernels raise if ever called."""
    try:
        import triton  # noqa: F401

        return
    except ImportError:
        pass
    name = "megatron.core.transformer.moe.ops.paged_stash"
    stub = types.ModuleType(name)
    stub.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*_a, **_k):
        raise BadState("MoE paged stash needs triton (GPU); this dense-model build has none")

    stub.paged_stash_copy_kernel = _unavailable
    stub.paged_stash_pop_kernel = _unavailable
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[name] = stub


@contextlib.contextmanager
def tensor_cuda_is_identity():
    """Within the block, `t.cuda()` returns `t` (CPU only)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


@contextlib.contextmanager
def cpu_float_reports_cuda_type():
    """Within the block, `t.type()` of a CPU float tensor is its CUDA type name."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" \
                and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _wrap(owner, name: str, context) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)

    kind = type(inspect.getattr_static(owner, name))
    if kind is classmethod:  # getattr gave the method bound to `owner`: call it as such
        setattr(owner, name, classmethod(lambda cls, *a, **k: wrapper(*a, **k)))
    else:
        setattr(owner, name, staticmethod(wrapper) if kind is staticmethod else wrapper)


def wrap_cuda_calls(owner, method: str) -> None:
    """`owner` is a class or a module; callers that look the name up at call time (methods,
    `module.function(...)`) get the wrapped version."""
    _wrap(owner, method, tensor_cuda_is_identity)


def cuda_available() -> bool:
    return torch.cuda.is_available()


# ---- CPU-only fast paths (our code, not patches; each switched on only without CUDA) ----------
# Every one is tested against the path it replaces (equal losses and gradients).
#   sdpa_attention: megatron's local DotProductAttention (the only core attention without TE)
#     computes causal attention unfused: scores [b, heads, s, s] in a buffer, a cast to fp32, a
#     masked_fill with a materialised causal mask, softmax, a cast back and a bmm, after
#     repeat_interleave copies of K and V for GQA. `_sdpa_core_attention` runs the same
#     attention as torch's scaled_dot_product_attention (causal, GQA, megatron's softmax scale;
#     fp32 accumulation like attention_softmax_in_fp32) where it is exactly that: no mask tensor
#     or bias, no sliding window, no dropout, vanilla softmax, no packed sequences. Anything else
#     takes megatron's own forward (tests/unit/test_compat.py compares the two).
#   onednn_linear: fp32 GEMMs of megatron's linear layers (layers.py's two linear functions,
#     TP=1 without their fusions) and of a transformers model's nn.Linear layers (`hf_linears`)
#     through oneDNN where a probe measures it faster than MKL (recipes/lib/cpu_linear.py).
FAST_PATHS = {"sdpa_attention": True, "onednn_linear": True}


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return FAST_PATHS["onednn_linear"] and cpu_linear.usable(x, weight)


def _onednn_linear(original):
    @functools.wraps(original)
    def linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
               sequence_parallel, *args, **kwargs):
        if (not args and kwargs.get("grad_output_buffer") is None
                and kwargs.get("gtp_remat_size", 1) == 1
                and not (gradient_accumulation_fusion or allreduce_dgrad or sequence_parallel)
                and _onednn(input, weight)):
            return cpu_linear.linear(input, weight, bias)
        return original(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                        sequence_parallel, *args, **kwargs)

    return linear


def _hf_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _onednn(x, module.weight):
        return cpu_linear.linear(x, module.weight, module.bias)
    return torch.nn.functional.linear(x, module.weight, module.bias)


def hf_linears(model: torch.nn.Module) -> torch.nn.Module:
    """A transformers model whose nn.Linear layers take the oneDNN fast path where it applies
    (see FAST_PATHS); the same model, returned for chaining. No-op with CUDA."""
    if not cuda_available():
        for m in model.modules():
            if type(m) is torch.nn.Linear:
                m.forward = functools.partial(_hf_linear, m)
    return model


def _sdpa_core_attention(original):
    from megatron.core.transformer.enums import AttnMaskType  # lazy: patched only in apply()

    @functools.wraps(original)
    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if not (FAST_PATHS["sdpa_attention"] and attention_mask is None
                and attention_bias is None and packed_seq_params is None
                and self.attn_mask_type == AttnMaskType.causal
                and self.scale_mask_softmax.window_size is None
                and getattr(self, "softmax_offset", None) is None
                and (self.attention_dropout.p == 0 or not self.training)
                and query.shape[0] == key.shape[0]):
            return original(self, query, key, value, attention_mask, attn_mask_type,
                            attention_bias, packed_seq_params)
        sq, b, heads, dim = query.shape  # [s, b, heads, dim] -> [b, heads, s, dim]
        out = torch.nn.functional.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
            is_causal=True, scale=self.softmax_scale * (self.scale_mask_softmax.scale or 1.0),
            enable_gqa=heads != key.shape[2])
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    return forward


# ---- training logits as the output layer computed them (CPU and GPU) --------------------------
# megatron/core/models/gpt/gpt_model.py `_postprocess` returns `logits.transpose(0, 1)
# .contiguous()` when no labels are given: a [b, s, v] copy of tokens x vocabulary for the
# student and again for the teacher (inside ModelOpt's DistillationModel) every micro-batch,
# which the training losses turn back into [s, b, v] or never read (ModelOpt's KD reads the
# output layer's own [s, b, v] output). Within `logits_as_computed()` the model returns the
# output layer's [s, b, v] tensor itself: a [b, s, v] transposed view handed to that last line
# transposes back to it, so `.contiguous()` has nothing to copy (a copy's cost is in
# docs/measured.md). Drop it when megatron can return the [s, b, v] logits itself.
_SBV = {"on": False}


@contextlib.contextmanager
def logits_as_computed():
    """Within the block a GPTModel called without labels returns [s, b, v] logits (see above)."""
    _SBV["on"] = True
    try:
        yield
    finally:
        _SBV["on"] = False


def _postprocess_keeping_layout(original):
    @functools.wraps(original)
    def postprocess(self, *args, **kwargs):
        labels = kwargs["labels"] if "labels" in kwargs else (args[3] if len(args) > 3 else None)
        if not _SBV["on"] or labels is not None:
            return original(self, *args, **kwargs)
        scale = self._scale_logits
        self._scale_logits = lambda logits: scale(logits).transpose(0, 1)  # undone just below
        try:
            return original(self, *args, **kwargs)
        finally:
            del self._scale_logits

    return postprocess


def apply() -> None:
    """Idempotently make megatron-core importable and runnable here. Call before importing it."""
    global _APPLIED
    if _APPLIED:
        return
    importable()
    upstream.check_versions()
    for path, expected in upstream.SIGNATURES.items():
        upstream.check_signature(path, expected)
    # lazy: megatron is imported here, in apply(), after the stand-in above
    from megatron.core.models.gpt.gpt_model import GPTModel
    GPTModel._postprocess = _postprocess_keeping_layout(GPTModel._postprocess)
    if not cuda_available():
        proxy = _CpuTorch()
        for mod_name in CUDA_HARDCODED_MODULES:
            mod = importlib.import_module(mod_name)
            mod.torch = proxy
        for mod_name, cls_name, method in CUDA_TENSOR_METHODS:
            mod = importlib.import_module(mod_name)
            wrap_cuda_calls(getattr(mod, cls_name) if cls_name else mod, method)
        for mod_name, cls_name, fn in CUDA_TYPE_CHECKING_CALLS:
            mod = importlib.import_module(mod_name)
            _wrap(getattr(mod, cls_name) if cls_name else mod, fn, cpu_float_reports_cuda_type)
        # lazy: megatron is imported here, in apply(), once the patches above are in
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        DotProductAttention.forward = _sdpa_core_attention(DotProductAttention.forward)
        use_unfused_optimizer()
        for mod_name, values in NO_CUDA_RNG.items():
            for name, value in values.items():
                setattr(importlib.import_module(mod_name), name, value)
        layers = importlib.import_module("megatron.core.tensor_parallel.layers")
        for fn in ("linear_with_grad_accumulation_and_async_allreduce",
                   "linear_with_frozen_weight"):  # called by name from ColumnParallelLinear
            setattr(layers, fn, _onednn_linear(getattr(layers, fn)))  # and RowParallelLinear
    _APPLIED = True
