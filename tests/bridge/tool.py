"""The Megatron-Bridge side of tests/stages/test_bridge.py, run as a subprocess with .bridge/
(scripts/bridge_env.sh) on PYTHONPATH, so that Bridge gets its own transformers:

    python tests/bridge/tool.py import HF_DIR OUT            HF -> Bridge checkpoint (AutoBridge)
    python tests/bridge/tool.py export CKPT HF_CONFIG OUT    Bridge's export_ckpt -> HF folder
    python tests/bridge/tool.py logits CKPT HF_CONFIG TOKENS OUT   load_megatron_model + forward
    python tests/bridge/tool.py export ... + logits ...     several, in one process (one import)

What Bridge 0.6.2 needs to run on this CPU, Python 3.11 machine, and nothing else, is set up by
`shim()` (test code, not the recipe's): `typing.override` (3.12) from typing_extensions; empty
stand-ins for three imports of code paths these commands never run (Transformer Engine inside
Bridge's LoRA layers only, einops in Qwen-VL, megatron.energon in its data loaders); the CUDA RNG
state Bridge saves read from the CPU generator; and the recipe's own CPU compatibility
(recipes/lib/compat.py) for megatron-core. Models are built with Bridge's local layer spec and
no fused kernels, fp32, on the CPU.
"""
import importlib.abc
import importlib.machinery
import sys
import types
import typing
from pathlib import Path

STANDINS = ("transformer_engine", "einops", "megatron.energon")


class _Anything(type):
    """A stand-in attribute: any name, subclassable, callable (as a no-op decorator too)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (object,), {})

    def __call__(cls, *a, **k):
        return a[0] if len(a) == 1 and callable(a[0]) and not k else super().__call__()


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (object,), {})


def _importer() -> str:
    f = sys._getframe(2)
    while f is not None:
        name = f.f_globals.get("__name__", "")
        if not name.startswith(("importlib", "_frozen")) and name != __name__:
            return name
        f = f.f_back
    return ""


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the stand-ins; Transformer Engine only to Bridge's own modules, so megatron-core
    keeps seeing no TE and builds its local spec."""

    def find_spec(self, fullname, path, target=None):
        top = next((p for p in STANDINS if fullname == p or fullname.startswith(p + ".")), None)
        if top and (top != "transformer_engine" or _importer().startswith("megatron.bridge")):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StandIn(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


def shim():
    import typing_extensions

    typing.override = typing_extensions.override
    sys.meta_path.insert(0, _Finder())
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from recipes.lib import compat

    compat.apply()
    import torch

    if not torch.cuda.is_available():
        torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
        torch.cuda.set_rng_state = lambda *a, **k: None
    import megatron.bridge  # noqa: F401

    for k in [k for k in sys.modules if k.split(".")[0] == "transformer_engine"]:
        del sys.modules[k]  # a later import by megatron-core finds no TE


def cpu_provider(provider):
    import torch
    from megatron.bridge.models.gpt_provider import local_layer_spec

    provider.transformer_layer_spec = local_layer_spec
    for f in ("apply_rope_fusion", "bias_activation_fusion", "masked_softmax_fusion",
              "persist_layer_norm", "gradient_accumulation_fusion", "cross_entropy_loss_fusion",
              "bias_dropout_fusion"):
        setattr(provider, f, False)
    provider.params_dtype, provider.bf16 = torch.float32, False
    return provider


def bridge_for(hf_config: str):
    from megatron.bridge import AutoBridge
    from transformers import AutoConfig

    return AutoBridge.from_hf_config(AutoConfig.from_pretrained(hf_config))


def main(argv):
    shim()
    while "+" in argv:
        i = argv.index("+")
        command(argv[:i])
        argv = argv[i + 1:]
    command(argv)


def command(argv):
    import torch
    from megatron.bridge import AutoBridge
    from megatron.bridge.training.model_load_save import temporary_distributed_context

    cmd, *a = argv
    if cmd == "import":
        hf, out = a
        bridge = AutoBridge.from_hf_pretrained(hf, dtype=torch.float32)
        provider = cpu_provider(bridge.to_megatron_provider(load_weights=True))
        provider.finalize()
        with temporary_distributed_context(backend="gloo"):
            model = provider.provide_distributed_model(wrap_with_ddp=False,
                                                       use_cpu_initialization=True)
            bridge.save_megatron_model(model, out, hf_tokenizer_path=hf)
    elif cmd == "export":
        ckpt, hf_config, out = a
        bridge_for(hf_config).export_ckpt(ckpt, out, show_progress=False)
    elif cmd == "logits":
        ckpt, hf_config, tokens, out = a
        tokens = torch.load(tokens)
        with temporary_distributed_context(backend="gloo"):
            model = bridge_for(hf_config).load_megatron_model(ckpt, wrap_with_ddp=False)[0]
            model.eval()
            pos = torch.arange(tokens.shape[1]).expand_as(tokens)
            with torch.no_grad():
                logits = model(tokens, pos, None)
        torch.save(logits.float(), out)
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
