"""What prune measures and reads back: ModelOpt's saved searcher state (per-layer head, neuron
and channel importance, its block-influence layer ranking) and the paper's contiguous depth
choice (the teacher's held-out loss with each block of layers removed)."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from recipes.lib import runtime
from recipes.lib.arch import Arch


def scores_file(tmp: Path) -> Path:
    """ModelOpt's saved searcher state (importance, layer scores) of this rank."""
    return tmp / "scores" / f"rank{torch.distributed.get_rank()}.pth"



def summary(scores: Path, arch: Arch) -> tuple[dict, dict]:
    """ModelOpt's saved activations -> per-layer head / neuron / channel importance, and a
    mixture of experts' expert importance (ModelOpt's: the mean L2 norm of each expert's
    routed output) per layer; an expert's neurons are keyed "<layer>.<expert>"."""
    state = torch.load(scores, map_location="cpu", weights_only=False)
    acts, layer_scores = state["local_activations"], state["layer_scores"]
    heads, neurons, experts, channels = {}, {}, {}, None
    for name, a in acts.items():
        if a is None:
            continue
        parts = name.split(".")
        if name.endswith("self_attention") and not isinstance(a, dict):
            per_head = a.pow(0.5).view(-1, arch.head_dim).norm(dim=1)
            heads[int(parts[-2])] = per_head.tolist()
        elif name.endswith(".mlp") and not isinstance(a, dict):
            neurons[int(parts[-2])] = a.pow(0.5)
        elif ".local_experts." in name:  # decoder.layers.<i>.mlp.experts.local_experts.<j>
            neurons[f"{parts[2]}.{parts[-1]}"] = a.pow(0.5)
        elif isinstance(a, dict) and "expert_l2_scores" in a:
            experts[int(parts[2])] = (a["expert_l2_scores"]
                                      / (a["expert_sample_counts"] + 1e-8)).tolist()
        elif isinstance(a, dict) and a:
            channels = torch.stack([v.pow(0.5) for v in a.values()]).sum(0)
    summary = {
        "heads": {str(k): v for k, v in sorted(heads.items())},
        **({"experts": {str(k): v for k, v in sorted(experts.items())}} if experts else {}),
        "neurons_quantiles": {str(k): torch.quantile(v.float(), torch.tensor(
            [0.0, 0.25, 0.5, 0.75, 1.0])).tolist() for k, v in sorted(
                neurons.items(), key=lambda kv: [int(x) for x in str(kv[0]).split(".")])},
        "channels": None if channels is None else channels.tolist(),
        "layer_scores_block_influence": {str(k): float(v) for k, v in layer_scores.items()},
    }
    return summary, {"neurons": neurons, "channels": channels, "heads": heads,
                     "experts": experts}


def modelopt_dropped(scores: Path, keep: int) -> list[int]:
    """The 1-indexed layers ModelOpt dropped to keep `keep`: its lowest block-influence scores."""
    layer_scores = torch.load(scores, map_location="cpu", weights_only=False)["layer_scores"]
    ranked = sorted(layer_scores, key=lambda k: float(layer_scores[k]), reverse=True)
    return sorted(int(x) for x in ranked[keep:])



@torch.no_grad()
def contiguous_candidates(model, arch: Arch, n_drop: int, heldout: torch.Tensor,
                          mbs: int) -> list[dict]:
    """Held-out loss of the teacher with each contiguous block of `n_drop` layers removed."""
    from recipes.lib import model as M  # lazy: megatron; prune's config check imports this module

    layers = model.decoder.layers
    out = []
    starts = range(1, arch.num_layers - n_drop + 2)
    for s in tqdm(starts, desc="depth candidates", unit="block", disable=not runtime.is_rank0()):
        block = set(range(s, s + n_drop))
        model.decoder.layers = torch.nn.ModuleList(
            [m for m in layers if m.layer_number not in block])
        try:
            res = M.forward_loss(model, heldout, arch.vocab_size, mbs)
        finally:
            model.decoder.layers = layers
        if res is not None:
            out.append({"drop_layers": [s, s + n_drop - 1], "loss": res[0] / res[1]})
    return out
