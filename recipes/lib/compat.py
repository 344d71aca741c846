"""CPU compatibility for megatron-core 0.19.2 and nvidia-modelopt 0.47.0.

The ONLY module in this project that patches upstream code. Everything here is applied by
`apply()` and only when CUDA is absent (or, for the import stand-ins, when the optional GPU
package is missing). Each patch names the upstream file it works around; delete the entry when
the upstream release we pin no longer needs it.

Mechanism 1: upstream modules that hard-code CUDA (``device='cuda'``,
``torch.cuda.current_device()``, ``torch.cuda.synchronize()``) get their module-global ``torch``
replaced by `_CpuTorch`, a thin proxy that forwards everything to the real ``torch`` but maps
CUDA device requests to the CPU. The patch is scoped to those modules; ``torch`` itself is
untouched for everyone else.

Mechanism 2: upstream methods that call `tensor.cuda()` run with `Tensor.cuda` returning the
tensor itself, for the duration of that call only (`CUDA_TENSOR_METHODS`).

Mechanism 3: upstream code that dispatches on `tensor.type()` being 'torch.cuda.FloatTensor' /
'torch.cuda.BFloat16Tensor' / 'torch.cuda.HalfTensor' runs with CPU float tensors reporting those
names, for the duration of that call only (`CUDA_TYPE_CHECKING_CALLS`).

Besides these, CPU-only fast paths (`FAST_PATHS`): where an upstream CPU fallback is slow, the
same computation done faster, switched on only without CUDA and tested for equal results
against the path it replaces.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types

import torch

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
}


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
]
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


def _install_triton_standin() -> None:
    """megatron/core/transformer/moe/ops/paged_stash.py imports triton at import time for MoE
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
        raise RuntimeError("MoE paged stash needs triton (GPU); this dense-model build has none")

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

    setattr(owner, name, wrapper)


def _wrap_cuda_calls(owner, method: str) -> None:
    """`owner` is a class or a module; callers that look the name up at call time (methods,
    `module.function(...)`) get the wrapped version."""
    _wrap(owner, method, tensor_cuda_is_identity)


def cuda_available() -> bool:
    return torch.cuda.is_available()


# ---- CPU-only fast paths (our code, not patches; each switched on only without CUDA) ----------
# Every one is tested against the path it replaces (equal losses and gradients).
#   fused_losses(): recipes/lib/kd.py computes the KD and LM losses in one chunked pass over the
#     logits instead of ModelOpt's LogitsKLLoss / megatron's vocab_parallel_cross_entropy, which
#     materialise ~10 fp32 copies of [tokens x vocab] (tests/unit/test_kd.py). On a GPU those
#     run as fused kernels and are left alone.
#   sdpa_attention: megatron's local DotProductAttention (the only core attention without TE)
#     computes causal attention unfused: scores [b, heads, s, s] in a buffer, a cast to fp32, a
#     masked_fill with a materialised causal mask, softmax, a cast back and a bmm, after
#     repeat_interleave copies of K and V for GQA. `_sdpa_core_attention` runs the same
#     attention as torch's scaled_dot_product_attention (causal, GQA, megatron's softmax scale;
#     fp32 accumulation like attention_softmax_in_fp32) where it is exactly that: no mask tensor
#     or bias, no sliding window, no dropout, vanilla softmax, no packed sequences. Anything else
#     takes megatron's own forward (tests/unit/test_compat.py compares the two).
FAST_PATHS = {"fused_losses": True, "sdpa_attention": True}


def fused_losses() -> bool:
    return FAST_PATHS["fused_losses"] and not cuda_available()


def _sdpa_core_attention(original):
    from megatron.core.transformer.enums import AttnMaskType

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


def apply() -> None:
    """Idempotently make megatron-core importable and runnable here. Call before importing it."""
    global _APPLIED
    if _APPLIED:
        return
    _install_triton_standin()
    if not cuda_available():
        proxy = _CpuTorch()
        for mod_name in CUDA_HARDCODED_MODULES:
            mod = importlib.import_module(mod_name)
            mod.torch = proxy
        for mod_name, cls_name, method in CUDA_TENSOR_METHODS:
            mod = importlib.import_module(mod_name)
            _wrap_cuda_calls(getattr(mod, cls_name) if cls_name else mod, method)
        for mod_name, cls_name, fn in CUDA_TYPE_CHECKING_CALLS:
            mod = importlib.import_module(mod_name)
            _wrap(getattr(mod, cls_name) if cls_name else mod, fn, cpu_float_reports_cuda_type)
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        DotProductAttention.forward = _sdpa_core_attention(DotProductAttention.forward)
    _APPLIED = True


# ---- ModelOpt Minitron pruning without Transformer Engine (local layer spec) -------------------
# modelopt/torch/nas/plugins/megatron.py imports transformer_engine at module level and registers
# dynamic modules for TE classes; without TE, `mcore_minitron` is silently not registered
# (KeyError: 'mcore_minitron'). Its head and hidden-size importance assume the TE layer spec
# (TEDotProductAttention, fused LayerNorm+Linear). `enable_modelopt()` imports the plugin with a
# stand-in for TE (stand-in classes that nothing ever instantiates), then teaches it the local
# spec, reusing ModelOpt's own hparams, slicing and importance math:
#   - SelfAttention with a local DotProductAttention core and local QKV / projection linears
#     (a QKV bias is sliced with its heads; per-head Q/K norms act on head_dim and stay whole);
#   - torch.nn.RMSNorm (the local spec's norm) as a dynamic norm, like ModelOpt's TE norm;
#   - hidden-size importance from the outputs of the separate norms (the paper's definition; TE
#     fuses the norm into the next linear, so ModelOpt reads it from there);
#   - depth pruning's `.cuda()` and a 0-dim all_gather_into_tensor that gloo rejects;
#   - modelopt/torch/utils/distributed.py broadcast/allgather move their buffers with .cuda().
# Drop this section when the pinned ModelOpt supports the local spec (or TE exists on CPU).
_TE_CLASSES = ("TEColumnParallelGroupedLinear", "TEColumnParallelLinear", "TEDotProductAttention",
               "TELayerNormColumnParallelLinear", "TELinear", "TERowParallelGroupedLinear",
               "TERowParallelLinear")
_MODELOPT_ENABLED = False


def _import_modelopt_plugins_without_te() -> None:
    # megatron modules the plugin imports must be imported first, without the stand-in, so
    # that megatron's own TE probes (get_te_version) never see it
    for m in ("megatron.core.models.hybrid.hybrid_layer_specs",
              "megatron.core.models.hybrid.hybrid_model", "megatron.core.models.gpt.moe_module_specs",
              "megatron.core.ssm.gated_delta_net", "megatron.core.transformer.multi_latent_attention",
              "megatron.core.transformer.moe.moe_layer", "megatron.core.transformer.moe.experts",
              "megatron.core.transformer.moe.shared_experts", "megatron.core.transformer.moe.router",
              "modelopt.torch.nas", "modelopt.torch.prune"):
        importlib.import_module(m)
    ext = importlib.import_module("megatron.core.extensions.transformer_engine")

    class _AbsentTE(torch.nn.Module):
        """Stands in for a Transformer Engine class; never instantiated."""

    te = types.ModuleType("transformer_engine")
    te.__version__ = "0.0.0"
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    te.pytorch.LayerNorm = type("LayerNorm", (_AbsentTE,), {})
    te.pytorch.RMSNorm = type("RMSNorm", (_AbsentTE,), {})
    saved = {n: getattr(ext, n) for n in _TE_CLASSES}
    sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"] = te, te.pytorch
    try:
        for n in _TE_CLASSES:
            setattr(ext, n, type(n, (_AbsentTE,), {}))
        importlib.import_module("modelopt.torch.nas.plugins.megatron")
        importlib.import_module("modelopt.torch.prune.plugins.mcore_minitron")
    finally:
        del sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"]
        for n, v in saved.items():
            setattr(ext, n, v)


def _teach_local_spec() -> None:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp
    from modelopt.torch.nas.modules import _DynamicLayerNorm
    from modelopt.torch.nas.plugins import megatron as P
    from modelopt.torch.opt.dynamic import DynamicModule
    from modelopt.torch.prune.plugins import mcore_minitron as MM

    class _DynamicTorchRMSNorm(_DynamicLayerNorm):
        def _setup(self, *, num_features):
            self._register_hparam("num_features", num_features)
            self._register_dynamic_attribute("weight", self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)

    if torch.nn.RMSNorm not in P.DMRegistry:  # a later ModelOpt may register it itself
        P.DMRegistry.register({torch.nn.RMSNorm: "torch.nn.RMSNorm"})(_DynamicTorchRMSNorm)

    te_qkv, te_proj = P._DynamicTEQKVLayerNormColumnParallelLinear, P._DynamicTEProjRowParallelLinear

    class _DynamicLocalQKV(DynamicModule, ColumnParallelLinear):
        _get_output_size_indices = te_qkv._get_output_size_indices

        def _setup(self, *, num_attention_heads, hidden_size):
            self._register_hparam("input_size", hidden_size)
            self._register_hparam("num_attention_heads", num_attention_heads)
            self._register_dynamic_attribute("output_size", lambda mod, val: (
                num_attention_heads.active + 2 * mod.config.num_query_groups
            ) * mod.config.kv_channels)
            self._register_dynamic_attribute("output_size_per_partition",
                                             lambda mod, val: mod.output_size)
            self._register_dynamic_attribute("weight", te_qkv._get_weight)
            if getattr(self, "bias", None) is not None and self.bias.numel() > 0:  # Qwen2
                self._register_dynamic_attribute("bias", te_qkv._get_bias)  # rows follow heads

    class _DynamicLocalProj(DynamicModule, RowParallelLinear):
        _get_input_size_indices = te_proj._get_input_size_indices

        def _setup(self, *, num_attention_heads, hidden_size):
            self._register_hparam("output_size", hidden_size)
            self._register_hparam("num_attention_heads", num_attention_heads)
            self._register_dynamic_attribute(
                "input_size", lambda mod, val: num_attention_heads.active * mod.config.kv_channels)
            self._register_dynamic_attribute("input_size_per_partition",
                                             lambda mod, val: mod.input_size)
            self._register_dynamic_attribute("weight", te_proj._get_weight)

    te_setup = P._DynamicSelfAttention._setup

    def attention_setup(self, *, hidden_size):
        if isinstance(self.core_attention, P.TEDotProductAttention) or \
                not self._prunes_attention_heads():
            return te_setup(self, hidden_size=hidden_size)
        heads = P.NumAttentionHeadsHp(self.num_attention_heads_per_partition,
                                      self.num_query_groups_per_partition)
        self._register_hparam("num_attention_heads", heads)
        self._register_dynamic_attribute("num_attention_heads_per_partition",
                                         lambda mod, val: mod.num_attention_heads)
        core_cls = type("_DynamicLocalDotProductAttention",
                        (DynamicModule, type(self.core_attention)), {"_setup": lambda s: None})
        core_cls.convert(self.core_attention)
        self.core_attention._register_dynamic_attribute(
            "num_attention_heads_per_partition", lambda mod, val: heads.active)
        self.core_attention._register_dynamic_attribute(
            "hidden_size_per_partition", lambda mod, val: heads.active * mod.config.kv_channels)
        _DynamicLocalQKV.convert(self.linear_qkv, num_attention_heads=heads, hidden_size=hidden_size)
        _DynamicLocalProj.convert(self.linear_proj, num_attention_heads=heads,
                                  hidden_size=hidden_size)

    P._DynamicSelfAttention._setup = attention_setup

    te_hidden_importance = MM._register_hidden_size_importance

    def hidden_size_importance(module, registry):
        norms = [n for layer in module.decoder.layers
                 for n in (layer.input_layernorm, layer.pre_mlp_layernorm)
                 if not isinstance(n, IdentityOp)]
        if not norms:  # TE spec: norms fused into linears, ModelOpt's own hooks apply
            return te_hidden_importance(module, registry)
        module._register_temp_attribute("_activations", {})

        def collect(mod, norm, _inp, out):  # ModelOpt's estimator, on the norm's output
            act = out.detach().to(torch.float32).abs().mean(dim=0).pow(2).sum(dim=0)
            prev = mod._activations.get(id(norm))
            mod._activations[id(norm)] = act if prev is None else prev + act

        def estimate(mod):
            assert mod._activations, "No activations collected for importance estimation."
            scores = torch.stack([a.pow(0.5) for a in mod._activations.values()]).sum(dim=0)
            torch.distributed.all_reduce(scores, op=torch.distributed.ReduceOp.SUM)
            return scores

        for norm in norms:
            registry.register_hook(norm, functools.partial(collect, module), hook_type="forward")
        registry.register_importance(module, "hidden_size", lambda: estimate(module))

    MM._register_hidden_size_importance = hidden_size_importance

    if cuda_available():  # a GPU without TE: the CUDA collectives below work as they are
        return
    drop = MM.drop_mcore_language_model_layers

    @functools.wraps(drop)
    def drop_layers_cpu(model, *, layers_to_drop):
        with tensor_cuda_is_identity(), _gloo_all_gather_into_tensor():
            return drop(model, layers_to_drop=layers_to_drop)

    MM.drop_mcore_language_model_layers = drop_layers_cpu

    from modelopt.torch.utils import distributed as modelopt_dist

    for fn in ("broadcast", "allgather"):
        _wrap_cuda_calls(modelopt_dist, fn)


@contextlib.contextmanager
def _gloo_all_gather_into_tensor():
    """gloo has no all_gather_into_tensor: emulate it with all_gather, within the block."""
    import torch.distributed as dist

    original = dist.all_gather_into_tensor

    def emulated(output, inp, group=None, async_op=False):
        parts = list(output.reshape(dist.get_world_size(group), -1).unbind(0))
        gathered = [torch.empty_like(p) for p in parts]
        dist.all_gather(gathered, inp.reshape(-1), group=group)
        output.copy_(torch.stack(gathered).reshape(output.shape))

    dist.all_gather_into_tensor = emulated
    try:
        yield
    finally:
        dist.all_gather_into_tensor = original


def enable_modelopt() -> None:
    """Make `mtp.prune(mode="mcore_minitron")` work for both layer specs; idempotent. Without
    Transformer Engine the plugin is imported with the TE stand-in; with TE it imports as is. In
    both cases ModelOpt is taught the local spec (so `spec=local` prunes on a GPU machine too),
    which leaves its own TE-spec handling untouched: each adapter defers to ModelOpt's code when
    it meets a TE module."""
    global _MODELOPT_ENABLED
    if _MODELOPT_ENABLED:
        return
    apply()
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        _import_modelopt_plugins_without_te()
    else:
        importlib.import_module("modelopt.torch.prune.plugins.mcore_minitron")
    _teach_local_spec()
    _MODELOPT_ENABLED = True
