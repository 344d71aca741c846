"""ModelOpt's Minitron pruning for megatron's local layer spec, with or without Transformer
Engine: `enable()` before `mtp.prune(mode="mcore_minitron")`.

ModelOpt 0.47 prunes only the TE layer spec. modelopt/torch/nas/plugins/megatron.py imports
transformer_engine at module level and registers dynamic modules for TE classes; without TE,
`mcore_minitron` is silently not registered (KeyError: 'mcore_minitron'). Its head and
hidden-size importance assume TEDotProductAttention and TE's fused LayerNorm+Linear. `enable()`
imports the plugin with a stand-in for TE where TE is absent (stand-in classes nothing ever
instantiates), then teaches it the local spec, reusing ModelOpt's own hparams, slicing and
importance math:
  - SelfAttention with a local DotProductAttention core and local QKV / projection linears (a
    QKV bias is sliced with its heads; per-head Q/K norms act on head_dim and stay whole);
  - torch.nn.RMSNorm (the local spec's norm) as a dynamic norm, like ModelOpt's TE norm;
  - hidden-size importance from the outputs of the separate norms (the paper's definition; TE
    fuses the norm into the next linear, so ModelOpt reads it from there);
  - on a CPU: depth pruning's `.cuda()` and its 0-dim all_gather_into_tensor that gloo rejects,
    and the `.cuda()` in modelopt/torch/utils/distributed.py's broadcast / allgather;
  - on every spec: a shared expert's sigmoid gate (megatron's `gate_weight`, [1, hidden];
    Qwen2-MoE), which ModelOpt 0.47 leaves whole when it prunes the hidden size, sliced with the
    hidden channels kept.
Each adapter defers to ModelOpt's own code when it meets a TE module, so the TE spec prunes as
ModelOpt wrote it. This is not CPU compatibility (recipes/lib/compat.py): `spec=local` on a GPU
uses it too. Drop it when the pinned ModelOpt prunes the local spec itself.

ModelOpt's megatron plugin is imported inside these functions (`# lazy`): only after `enable()`
has put the TE stand-in in place can it be imported at all.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types

import torch
import torch.distributed as dist

from recipes.lib import compat, runtime, upstream

_TE_CLASSES = ("TEColumnParallelGroupedLinear", "TEColumnParallelLinear", "TEDotProductAttention",
               "TELayerNormColumnParallelLinear", "TELinear", "TERowParallelGroupedLinear",
               "TERowParallelLinear")
_ENABLED = False
# megatron modules the plugin imports, imported first without the stand-in, so that megatron's
# own TE probes (get_te_version) never see it
_IMPORT_FIRST = (
    "megatron.core.models.hybrid.hybrid_layer_specs", "megatron.core.models.hybrid.hybrid_model",
    "megatron.core.models.gpt.moe_module_specs", "megatron.core.ssm.gated_delta_net",
    "megatron.core.transformer.multi_latent_attention", "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.experts", "megatron.core.transformer.moe.shared_experts",
    "megatron.core.transformer.moe.router", "modelopt.torch.nas", "modelopt.torch.prune")


def enable() -> None:
    """Make `mtp.prune(mode="mcore_minitron")` work for both layer specs; idempotent."""
    global _ENABLED
    if _ENABLED:
        return
    compat.apply()
    if runtime.te_installed():
        importlib.import_module("modelopt.torch.prune.plugins.mcore_minitron")
    else:
        _import_plugins_without_te()
    # lazy: importable only now (see the module doc)
    from modelopt.torch.nas.plugins import megatron as P
    from modelopt.torch.prune.plugins import mcore_minitron as MM

    _register_rmsnorm(P)
    _teach_attention(P)
    _teach_hidden_size_importance(MM)
    _teach_shared_expert_gate(P)
    if not compat.cuda_available():  # a GPU without TE: the CUDA collectives work as they are
        _cpu_depth_pruning(MM)
    _ENABLED = True


def _import_plugins_without_te() -> None:
    for m in _IMPORT_FIRST:
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
    saved_modules = {n: sys.modules.get(n) for n in ("transformer_engine",
                                                     "transformer_engine.pytorch")}
    sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"] = te, te.pytorch
    try:
        for n in _TE_CLASSES:
            setattr(ext, n, type(n, (_AbsentTE,), {}))
        importlib.import_module("modelopt.torch.nas.plugins.megatron")
        importlib.import_module("modelopt.torch.prune.plugins.mcore_minitron")
    finally:
        for n, mod in saved_modules.items():
            if mod is None:
                del sys.modules[n]
            else:
                sys.modules[n] = mod
        for n, v in saved.items():
            setattr(ext, n, v)


def _register_rmsnorm(P) -> None:
    """torch.nn.RMSNorm (the local spec's norm) as a dynamic norm."""
    # lazy: importable only after enable() (see the module doc)
    from modelopt.torch.nas.modules import _DynamicLayerNorm

    class _DynamicTorchRMSNorm(_DynamicLayerNorm):
        def _setup(self, *, num_features):
            self._register_hparam("num_features", num_features)
            self._register_dynamic_attribute("weight", self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)

    if torch.nn.RMSNorm not in P.DMRegistry:  # a later ModelOpt may register it itself
        P.DMRegistry.register({torch.nn.RMSNorm: "torch.nn.RMSNorm"})(_DynamicTorchRMSNorm)


def _local_linears(P) -> tuple[type, type]:
    """Dynamic versions of the local spec's QKV and output-projection linears, sliced by
    ModelOpt's TE-linear index functions (the weight layouts are the same)."""
    # lazy: importable only after enable() (see the module doc)
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from modelopt.torch.opt.dynamic import DynamicModule

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

    return _DynamicLocalQKV, _DynamicLocalProj


def _teach_attention(P) -> None:
    """SelfAttention with a local core attention: heads as ModelOpt's hparam, the core and both
    linears made dynamic over it."""
    # lazy: importable only after enable() (see the module doc)
    from modelopt.torch.opt.dynamic import DynamicModule

    qkv_cls, proj_cls = _local_linears(P)
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
        qkv_cls.convert(self.linear_qkv, num_attention_heads=heads, hidden_size=hidden_size)
        proj_cls.convert(self.linear_proj, num_attention_heads=heads, hidden_size=hidden_size)

    P._DynamicSelfAttention._setup = attention_setup


def _teach_shared_expert_gate(P) -> None:
    """The shared expert's gate follows the hidden channels ModelOpt keeps (and their order)."""
    setup = P._DynamicMLP._setup

    def mlp_setup(self, *, hidden_size, hp_name):
        setup(self, hidden_size=hidden_size, hp_name=hp_name)
        if getattr(self, "gate_weight", None) is not None:  # SharedExpertMLP with a gate
            self._register_dynamic_attribute(
                "gate_weight", lambda mod, w: w[:, hidden_size.active_slice])

    P._DynamicMLP._setup = mlp_setup


def _teach_hidden_size_importance(MM) -> None:
    """Hidden-size importance from the outputs of the local spec's separate norms (ModelOpt's
    own estimator; TE fuses the norm into the next linear and ModelOpt hooks that)."""
    # lazy: megatron, after compat.apply() in enable()
    from megatron.core.transformer.identity_op import IdentityOp

    te_hidden_importance = MM._register_hidden_size_importance
    upstream.check_signature(f"{MM.__name__}:_register_hidden_size_importance",
                             ("module", "registry"), te_hidden_importance)

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
            dist.all_reduce(scores, op=dist.ReduceOp.SUM)
            return scores

        for norm in norms:
            registry.register_hook(norm, functools.partial(collect, module), hook_type="forward")
        registry.register_importance(module, "hidden_size", lambda: estimate(module))

    MM._register_hidden_size_importance = hidden_size_importance


def _cpu_depth_pruning(MM) -> None:
    """Depth pruning and ModelOpt's object collectives on gloo (CPU)."""
    # lazy: importable only after enable() (see the module doc)
    from modelopt.torch.utils import distributed as modelopt_dist

    drop = MM.drop_mcore_language_model_layers
    upstream.check_signature(f"{MM.__name__}:drop_mcore_language_model_layers",
                             ("model", "layers_to_drop"), drop)

    @functools.wraps(drop)
    def drop_layers_cpu(model, *, layers_to_drop):
        with compat.tensor_cuda_is_identity(), _gloo_all_gather_into_tensor():
            return drop(model, layers_to_drop=layers_to_drop)

    MM.drop_mcore_language_model_layers = drop_layers_cpu
    for fn in ("broadcast", "allgather"):
        compat.wrap_cuda_calls(modelopt_dist, fn)


@contextlib.contextmanager
def _gloo_all_gather_into_tensor():
    """gloo has no all_gather_into_tensor: emulate it with all_gather, within the block."""
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
