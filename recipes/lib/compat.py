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


# (module, class, method) whose body calls tensor.cuda()
CUDA_TENSOR_METHODS = [
    # LanguageModule.setup_embeddings_and_output_layer: `weight.data.cuda()` before the all-reduce
    # that ties input and output embeddings across pipeline stages (tied models at PP>1)
    ("megatron.core.models.common.language_module.language_module", "LanguageModule",
     "setup_embeddings_and_output_layer"),
]


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


def _wrap_cuda_calls(cls, method: str) -> None:
    fn = getattr(cls, method)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with tensor_cuda_is_identity():
            return fn(*args, **kwargs)

    setattr(cls, method, wrapper)


def cuda_available() -> bool:
    return torch.cuda.is_available()


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
            _wrap_cuda_calls(getattr(importlib.import_module(mod_name), cls_name), method)
    _APPLIED = True
