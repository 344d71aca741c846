"""Stage `prune`: Minitron structured pruning of the converted teacher with ModelOpt.

    python -m recipes.prune --config conf/llama31_8b_to_4b_width.yaml run.dir=runs/w
    torchrun --nproc-per-node 2 -m recipes.prune --config ... parallel.pp=2

Importance comes from forward passes over `calib_samples` windows of the data stage's train
split (ModelOpt `mcore_minitron`: heads from the attention output, neurons from the input of
linear_fc2, embedding channels from the layernorm outputs). Width targets (hidden_size,
ffn_hidden_size, num_attention_heads) go to `mtp.prune` as its export_config. Depth
(num_layers) has three methods:
  drop_layers      an explicit list, 1-indexed as in the paper (16..31 = HF layers 15..30);
  contiguous       the paper's: the contiguous block whose removal raises the teacher's held-out
                   LM loss least (all candidates are evaluated and tabled);
  block_influence  ModelOpt's own ranking (1 - cosine(input, output) per layer).
TP must be 1 (ModelOpt's requirement); PP may be anything.
Output: <run.dir>/prune/{iter_0000000/, latest_checkpointed_iteration.txt, importance.json,
importance.pt, manifest.json, ...}: also a Megatron-Bridge / Megatron-LM checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from recipes.lib import checkpoint, compat, config, interop, mapping, runtime, stage, tokens
from recipes.lib.arch import DEPTH_METHODS, WIDTH_KEYS, Arch, pruned_arch, validate_layout
from recipes.lib.stage import StageDir, fingerprint, read_manifest

log = logging.getLogger("recipes.prune")


@dataclasses.dataclass(kw_only=True)
class PruneConfig:
    input: str
    """The teacher: a convert (or teacher_correction) stage folder, or a Megatron-Bridge /
    Megatron-LM checkpoint folder (recipes/lib/interop.py)."""
    input_hf_config: str | None = None
    """Only for a Megatron-LM checkpoint as `input` (or one whose run_config.yaml should be
    overridden): the model's HF config.json, or an HF folder (its tokenizer is used too)."""
    data: str
    """The data stage folder (calibration from train, depth candidates from valid)."""
    output: str | None = None
    """Output folder; default <run.dir>/prune."""
    hidden_size: int | None = None
    """Target embedding channels (None: keep)."""
    ffn_hidden_size: int | None = None
    """Target MLP neurons (None: keep)."""
    num_attention_heads: int | None = None
    """Target query heads, a multiple of the KV groups (None: keep)."""
    num_layers: int | None = None
    """Target layers (None: keep, or teacher layers minus len(drop_layers))."""
    depth_method: str = "contiguous"
    """drop_layers | contiguous | block_influence."""
    drop_layers: list | None = None
    """1-indexed layers to drop (depth_method=drop_layers)."""
    calib_samples: int = 1024
    """Calibration windows (the paper: 1024)."""
    seq_length: int = 4096
    """Tokens per calibration / held-out window."""
    micro_batch_size: int = 1
    """Windows per forward pass."""
    depth_eval_samples: int = 64
    """Held-out (valid split) windows per contiguous-block candidate."""
    dtype: str = "bf16"
    """Compute and checkpoint dtype: fp32 | bf16."""
    spec: str = "auto"
    """Layer spec of the model the importance is measured on: auto (TE when present) | local |
    te. ModelOpt prunes either (recipes/lib/compat.py teaches it the local spec)."""

    def __post_init__(self):
        if self.depth_method not in DEPTH_METHODS:
            raise ValueError(f"prune.depth_method={self.depth_method!r}; use one of {DEPTH_METHODS}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"prune.dtype={self.dtype!r}; use fp32 or bf16")
        if self.drop_layers is not None and self.depth_method != "drop_layers":
            raise ValueError("prune.drop_layers is set but prune.depth_method="
                             f"{self.depth_method}; set prune.depth_method=drop_layers")
        for k in ("calib_samples", "seq_length", "micro_batch_size", "depth_eval_samples"):
            if getattr(self, k) < 1:
                raise ValueError(f"prune.{k} must be >= 1")
        if self.calib_samples % self.micro_batch_size:
            raise ValueError(f"prune.calib_samples={self.calib_samples} is not a multiple of "
                             f"prune.micro_batch_size={self.micro_batch_size}")


def check_data(c: PruneConfig, data_manifest: dict, need_valid: bool) -> None:
    for split, n in (("train", c.calib_samples), ("valid", c.depth_eval_samples if need_valid
                                                   else 0)):
        avail = tokens.available_windows(data_manifest["tokens"][split], c.seq_length)
        if n > avail:
            raise ValueError(f"prune needs {n} windows of {c.seq_length + 1} tokens from the "
                             f"{split} split, which has {data_manifest['tokens'][split]} tokens "
                             f"({avail} windows); lower prune.calib_samples / "
                             "prune.depth_eval_samples / prune.seq_length or add data")


@torch.no_grad()
def contiguous_candidates(model, arch: Arch, n_drop: int, heldout: torch.Tensor,
                          mbs: int) -> list[dict]:
    """Held-out loss of the teacher with each contiguous block of `n_drop` layers removed."""
    from recipes.lib import model as M

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


def importance_summary(scores_file: Path, arch: Arch) -> tuple[dict, dict]:
    """ModelOpt's saved activations -> per-layer head / neuron / channel importance."""
    state = torch.load(scores_file, map_location="cpu", weights_only=False)
    acts, layer_scores = state["local_activations"], state["layer_scores"]
    heads, neurons, channels = {}, {}, None
    for name, a in acts.items():
        if a is None:
            continue
        if name.endswith("self_attention") and not isinstance(a, dict):
            layer = int(name.split(".")[-2])
            per_head = a.pow(0.5).view(-1, arch.head_dim).norm(dim=1)
            heads[layer] = per_head.tolist()
        elif name.endswith(".mlp") and not isinstance(a, dict):
            neurons[int(name.split(".")[-2])] = a.pow(0.5)
        elif isinstance(a, dict) and a:
            channels = torch.stack([v.pow(0.5) for v in a.values()]).sum(0)
    summary = {
        "heads": {str(k): v for k, v in sorted(heads.items())},
        "neurons_quantiles": {str(k): torch.quantile(v.float(), torch.tensor(
            [0.0, 0.25, 0.5, 0.75, 1.0])).tolist() for k, v in sorted(neurons.items())},
        "channels": None if channels is None else channels.tolist(),
        "layer_scores_block_influence": {str(k): float(v) for k, v in layer_scores.items()},
    }
    return summary, {"neurons": neurons, "channels": channels, "heads": heads}


def run(cfg: config.Config) -> dict:
    c: PruneConfig = cfg.prune
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if tp != 1:
        raise ValueError(f"parallel.tp={tp}: ModelOpt Minitron pruning requires TP=1; prune with "
                         "parallel.tp=1 parallel.pp=N, then distill at any TP/PP")
    out = Path(c.output or Path(cfg.run.dir) / "prune")
    source = interop.open_source(c.input, "prune.input", ("convert", "teacher_correction"),
                                 c.input_hf_config)
    src, teacher = source.path, source.arch
    student, drop = pruned_arch(teacher, c)
    n_drop = teacher.num_layers - student.num_layers
    data_manifest = tokens.data_manifest(c.data, teacher.vocab_size, "prune.data")
    check_data(c, data_manifest, need_valid=n_drop > 0 and c.depth_method == "contiguous")
    validate_layout(teacher, tp, pp)
    teacher.check_seq_length(c.seq_length, "prune.seq_length")
    spec = runtime.resolve_spec(c.spec)  # spec=te without Transformer Engine fails here
    if student.num_layers % pp:
        raise ValueError(f"the pruned model's {student.num_layers} layers do not divide into "
                         f"parallel.pp={pp} stages; choose a PP that divides both layer counts")
    sdir = StageDir("prune", out, fingerprint(c, {"pp": pp, "seed": cfg.run.seed}),
                    cfg.run.force, inputs={"input": source.input(), "data": c.data})
    if sdir.already_done():
        log.info("%s is complete (same config): skipping", out)
        return read_manifest(out)
    log.info("prune %s: %s -> %s (%.3fB -> %.3fB parameters)", src,
             {k: getattr(teacher, k) for k in (*WIDTH_KEYS, "num_layers")},
             {k: getattr(student, k) for k in (*WIDTH_KEYS, "num_layers")},
             teacher.num_params() / 1e9, student.num_params() / 1e9)
    if drop:
        log.info("dropping layers %s (1-indexed) = HF model.layers.%s (0-indexed)", drop,
                 [x - 1 for x in drop])

    with runtime.distributed(tp, pp, cfg.run.seed):
        compat.enable_modelopt()
        import modelopt.torch.prune as mtp
        from modelopt.torch.prune.plugins import mcore_minitron as MM

        from recipes.lib import model as M

        tmp = sdir.begin()
        model = M.build(teacher, dtype=c.dtype, spec=c.spec, init=False)
        checkpoint.load(model, source.weights, teacher.vocab_size)
        calib = tokens.windows(c.data, "train", c.seq_length, c.calib_samples, cfg.run.seed)
        table = None
        if n_drop and c.depth_method == "contiguous":
            heldout = tokens.windows(c.data, "valid", c.seq_length, c.depth_eval_samples,
                                     cfg.run.seed + 1)
            table = contiguous_candidates(model, teacher, n_drop, heldout, c.micro_batch_size)
            box = [table]
            torch.distributed.broadcast_object_list(box, src=0)
            table = box[0]
            best = min(table, key=lambda r: r["loss"])
            drop = list(range(best["drop_layers"][0], best["drop_layers"][1] + 1))
            log.info("contiguous: least harmful block %s (held-out loss %.4f)", best["drop_layers"],
                     best["loss"])

        def forward_loop(m):
            bar = tqdm(total=c.calib_samples, desc="calibration", unit="seq",
                       disable=not runtime.is_rank0())
            for i in range(0, c.calib_samples, c.micro_batch_size * 8):
                M.forward_loss(m, calib[i: i + c.micro_batch_size * 8], teacher.vocab_size,
                               c.micro_batch_size)
                bar.update(min(c.micro_batch_size * 8, c.calib_samples - i))
            bar.close()

        export_config = {k: getattr(student, k) for k in WIDTH_KEYS}
        if n_drop and c.depth_method == "block_influence":
            export_config["num_layers"] = student.num_layers
        scores_dir = tmp / "scores"  # ModelOpt writes <dir>/rank<r>.pth (searcher state)
        scores = scores_dir / f"rank{torch.distributed.get_rank()}.pth"
        mode = MM.get_mcore_minitron_config(hidden_size_divisor=1, ffn_hidden_size_divisor=1,
                                            num_layers_divisor=1)
        model, _ = mtp.prune(model, mode=[("mcore_minitron", mode)],
                             constraints={"export_config": export_config}, dummy_input=None,
                             config={"forward_loop": forward_loop,
                                     "scores_path": str(scores_dir) + "/"})
        if drop:
            MM.drop_mcore_language_model_layers(model, layers_to_drop=drop)
        elif n_drop:  # block_influence: ModelOpt dropped its lowest-scored layers
            layer_scores = torch.load(scores, map_location="cpu", weights_only=False)["layer_scores"]
            ranked = sorted(layer_scores, key=lambda k: float(layer_scores[k]), reverse=True)
            drop = sorted(int(x) for x in ranked[student.num_layers:])

        summary = runtime.on_rank0(lambda: importance_summary(scores, teacher))
        # Rebuild the pruned weights as a checkpoint at the student's own layout: gather them as
        # HF tensors, then write them with convert's streaming writer (any PP, even layers).
        hf = M.gather_hf(model, student)
        del model
        staging = tmp / "staging"
        runtime.on_rank0(lambda: _write_staging(hf, staging))
        hf = None  # free the gathered tensors before the streaming save
        runtime.barrier()
        reader = checkpoint.HFReader(staging, mapping.hf_names(student))
        checkpoint.save_from_hf(student, reader, interop.iteration_dir(tmp, 0), c.dtype, "save")
        runtime.barrier()

        def finish():
            import shutil

            shutil.rmtree(staging)
            interop.write_layout(tmp, student, 0, tp=tp, pp=pp, dtype=c.dtype, spec=spec)
            checkpoint.write_sidecars(tmp, source.hf_config, source.tokenizer)
            imp, full = summary
            imp["depth"] = {"method": c.depth_method if n_drop else None,
                            "drop_layers_1indexed": drop, "hf_layers_dropped_0indexed":
                            [x - 1 for x in drop] if drop else None, "candidates": table}
            (tmp / "importance.json").write_text(json.dumps(imp, indent=1) + "\n")
            torch.save(full, tmp / "importance.pt")
            shutil.rmtree(scores_dir)
            (tmp / "config.yaml").write_text(config.to_yaml(cfg))

        runtime.on_rank0(finish)
        return sdir.commit({
            "input": {**source.provenance(), "data": str(Path(c.data).resolve())},
            "arch": student.to_dict(), "num_params": student.num_params(),
            "teacher": {"arch": teacher.to_dict(), "num_params": teacher.num_params()},
            "dtype": c.dtype, "parallel": {"tp": tp, "pp": pp},
            "depth": {"method": c.depth_method if n_drop else None, "drop_layers_1indexed": drop,
                      "hf_layers_dropped_0indexed": [x - 1 for x in drop] if drop else None},
            "metrics": {"params_ratio": student.num_params() / teacher.num_params(),
                        "calib_samples": c.calib_samples, "seq_length": c.seq_length}})


def _write_staging(hf: dict, folder: Path) -> None:
    folder.mkdir(parents=True)
    checkpoint.write_hf(hf, folder, 2 << 30)


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "prune", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
