"""The CPU compatibility module: scoped, idempotent, and it does what each entry says."""
import importlib
import importlib.util

import pytest
import torch

from recipes.lib import compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only patches")


def test_patches_are_scoped_to_the_listed_modules():
    compat.apply()
    compat.apply()  # idempotent
    for name in compat.CUDA_HARDCODED_MODULES:
        assert isinstance(importlib.import_module(name).torch, compat._CpuTorch), name
    import megatron.core.transformer.transformer_block as untouched

    assert untouched.torch is torch
    assert torch.cuda.current_device is not compat._CpuCuda.current_device


def test_proxy_maps_cuda_to_cpu():
    proxy = compat._CpuTorch()
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert proxy.tensor([1.0], device=torch.device("cuda")).device.type == "cpu"
    assert proxy.cuda.current_device() == "cpu"
    assert proxy.float32 is torch.float32  # everything else is the real torch


def test_tensor_cuda_identity_is_temporary():
    t = torch.ones(1)
    with compat.tensor_cuda_is_identity():
        assert t.cuda() is t
    with pytest.raises((AssertionError, RuntimeError)):
        t.cuda()


def test_triton_standin_raises_if_used():
    if importlib.util.find_spec("triton") is not None:
        pytest.skip("triton is installed: megatron's real paged_stash is used, no stand-in")
    compat.apply()
    from megatron.core.transformer.moe.ops import paged_stash

    with pytest.raises(RuntimeError, match="needs triton"):
        paged_stash.paged_stash_copy_kernel()
