"""What the upstream patches (recipes/lib/compat.py, modelopt_local.py) were written for, checked
when they are applied: the installed megatron-core / ModelOpt against WRITTEN_FOR (a mismatch is
warned about once, with the versions: the patches may no longer fit), and the leading
parameters of every upstream callable a wrapper reads by position against SIGNATURES (a change
refuses, naming the callable and both parameter lists: the wrapper would otherwise pass the
wrong values silently). tests/unit/test_compat.py holds the installed releases to both."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import inspect
import logging

from recipes.lib.errors import BadState

WRITTEN_FOR = {"megatron-core": "0.19.2", "nvidia-modelopt": "0.47.0"}
LINEAR = ("input", "weight", "bias", "gradient_accumulation_fusion", "allreduce_dgrad",
          "sequence_parallel")
# upstream callables a wrapper reads by position -> the leading parameters it relies on
SIGNATURES = {
    "megatron.core.tensor_parallel.layers:linear_with_grad_accumulation_and_async_allreduce":
        LINEAR,  # _onednn_linear: the first six, positionally
    "megatron.core.tensor_parallel.layers:linear_with_frozen_weight": LINEAR,
    "megatron.core.models.gpt.gpt_model:GPTModel._postprocess":  # labels as args[3]
        ("self", "hidden_states", "input_ids", "position_ids", "labels"),
    "megatron.core.transformer.dot_product_attention:DotProductAttention.forward":
        ("self", "query", "key", "value", "attention_mask", "attn_mask_type", "attention_bias",
         "packed_seq_params"),  # _sdpa_core_attention passes them on positionally
}
_WARNED: set = set()  # what this process has warned about


def check_versions(written_for: dict = WRITTEN_FOR, version=None) -> list[str]:
    """The installed releases that differ from those the patches were written for, each warned
    about once per process (the patches may no longer fit: run the tests)."""
    version = version or md.version
    out = []
    for pkg, want in written_for.items():
        try:
            got = version(pkg)
        except md.PackageNotFoundError:
            continue
        if got != want:
            out.append(f"{pkg} {got} (written for {want})")
    new = [x for x in out if x not in _WARNED]
    if new:
        _WARNED.update(new)
        logging.getLogger("recipes.compat").warning(
            "the upstream patches in recipes/lib/compat.py and modelopt_local.py were written "
            "for other releases: %s; `make test` says whether they still hold", ", ".join(new))
    return out


def resolve(path: str):
    """`module:Attr.attr` -> the object."""
    mod, attr = path.split(":")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def check_signature(path: str, expected: tuple, obj=None) -> None:
    """Refuse where the upstream callable's leading parameters are not `expected`: a wrapper
    reading them by position would pass the wrong values."""
    fn = obj if obj is not None else resolve(path)
    got = tuple(inspect.signature(inspect.unwrap(fn)).parameters)[:len(expected)]
    if got != tuple(expected):
        raise BadState(f"{path} now takes {got}, where the patch that wraps it reads "
                       f"{tuple(expected)}: this megatron-core / ModelOpt is not the one "
                       f"{WRITTEN_FOR} the patches were written for; install the pinned "
                       "releases (requirements-engine.txt, requirements.txt)")
