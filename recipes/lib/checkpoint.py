"""Checkpoint I/O: megatron distributed checkpoints (torch_dist) from HF weights (read by
hf_weights.py) and between stages, HF folders out, and the sidecars every checkpoint folder of
ours carries:

    <stage>/iter_NNNNNNN/     megatron dist checkpoint (loadable at any TP/PP), with the tracker
                              and run_config.yaml that make the stage folder a Megatron-Bridge /
                              Megatron-LM checkpoint too (interop.py), and integrity.json (size
                              and CRC32 of each file, checked before a load: integrity.py)
    <stage>/hf_config.json    the source HF config (token ids etc. for export)
    <stage>/tokenizer/        the source tokenizer files
    <stage>/manifest.json     with "arch": the architecture of the checkpoint

Why convert streams with its own safetensors reader (`hf_weights.HFReader`, `save_from_hf`)
instead of ModelOpt's `import_mcore_gpt_from_hf`: that importer fills a fully built megatron
model, so the process holds every weight (plus the HF tensors it reads through mmap) before
anything is written.
Here the model is built on the meta device and megatron's checkpoint writer pulls one chunk at a
time (bench/convert.py measures the peak against a plain transformers load, docs/measured.md),
and an 8B converts on hosts with far less memory than the model. `safe_open(...).get_slice`
would read the same bytes but through mmap, whose touched pages count towards the peak.

Layer specs: checkpoints do not depend on the spec that wrote them. megatron's local spec maps
its norm keys onto the TE spec's fused names (`linear_qkv.layer_norm_weight`, ...), so both
write the same sharded keys; only TE's `_extra_state` (fp8 metadata) differs, and `load` allows
exactly that difference and nothing else.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from recipes.lib import compat, integrity, interop, mapping, runtime
from recipes.lib.arch import Arch
from recipes.lib.hf_weights import TOKENIZER_FILES, HFReader
from recipes.lib.preempt import signals_deferred
from recipes.lib.errors import MissingInput, MissingKey, Refusal

def _dist_ckpt():
    compat.apply()
    # lazy: megatron after compat.apply(); light stages read this module
    from megatron.core import dist_checkpointing

    return dist_checkpointing


def dist_save(sharded_state_dict: dict, directory: Path) -> None:
    """megatron's dist_checkpointing.save, the one place a torch_dist checkpoint is written:
    with SIGUSR1 / SIGTERM held, so the helper processes its writer starts outlive a scheduler's
    signal (preempt.signals_deferred)."""
    with signals_deferred():
        _dist_ckpt().save(sharded_state_dict, str(directory))


def save(model, directory: Path, iteration: int = 0) -> None:
    """Save the (possibly TP/PP-sharded) model as one torch_dist checkpoint, with the common
    state Bridge and Megatron-LM read (`interop.common_state`); collective. Written beside
    `directory` and renamed into place: a kill leaves the old folder or the new one."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    if runtime.is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    runtime.barrier()
    dist_save({**model.sharded_state_dict(), **interop.common_state(iteration)}, tmp)
    runtime.barrier()
    integrity.write(tmp)
    runtime.barrier()
    if runtime.is_rank0():
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    runtime.barrier()


def save_streaming(meta_model, directory: Path,
                   materialize: Callable[[str, tuple, tuple], torch.Tensor],
                   iteration: int = 0) -> None:
    """Write a torch_dist checkpoint for `meta_model` (built on the meta device: structure only)
    without ever holding the model: megatron supplies the sharded keys, shapes and metadata; each
    chunk's data comes from `materialize(sharded_key, global_offset, chunk_sizes)` at the moment
    torch's serial writer reaches it, one chunk at a time. Collective; loads like `save`."""
    dc = _dist_ckpt()
    # lazy: megatron, after compat.apply() in _dist_ckpt()
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.planner import WriteItemType

    class StreamingPlanner(MCoreSavePlanner):
        def resolve_data(self, item):
            if item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(item)
            return materialize(item.index.fqn, tuple(item.index.offset),
                               tuple(item.tensor_data.chunk.sizes))

    class StreamingStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            planner = StreamingPlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                       flatten_state_dict=False, flatten_sharded_tensors=False)
            try:
                dcp.save(mcore_to_pyt_state_dict(sd, False), planner=planner,
                         storage_writer=dcp.FileSystemWriter(checkpoint_dir, thread_count=1,
                                                             sync_files=False))
            except dcp.api.CheckpointException as e:  # a BaseException wrapping each rank's
                raise e.failures[min(e.failures)][0] from e  # error: the reader's, as raised

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dc.save({**meta_model.sharded_state_dict(), **interop.common_state(iteration)},
            str(directory), sharded_strategy=StreamingStrategy())
    runtime.barrier()
    integrity.write(directory)


# keys one layer spec has and the other lacks: TE modules' fp8 metadata (absent from local-spec
# checkpoints, and unused by a local-spec model). Any other mismatch is an error.
SPEC_ONLY_SUFFIX = "_extra_state"


def _spec_only(key: str) -> bool:
    return key.endswith(SPEC_ONLY_SUFFIX)


VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def load(model, directory: Path, vocab_size: int | None = None, retarget=None) -> None:
    """Load a torch_dist checkpoint into `model` at whatever TP/PP and layer spec it was built;
    collective. Keys present on one side only are refused by name, except TE's `_extra_state`,
    the common state megatron / Bridge / Megatron-LM keep beside the model and the optimizer and
    RNG state of a training checkpoint (interop.py). A checkpoint with fewer vocabulary rows
    than the model (Bridge does not pad) loads its rows and leaves the rest zero; one with fewer
    than the real `vocab_size` is refused. `retarget(sharded)`: rewrites the model's sharded
    state dict in place first (a HybridModel reading a GPT checkpoint, recipes/lib/hybrid.py)."""
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise MissingInput(f"{directory} is not a megatron distributed checkpoint "
                           "(no metadata.json); point at a finished stage folder")
    integrity.refuse_damaged(directory)  # every file's size and CRC32, before reading a tensor
    # lazy: megatron, after compat.apply() in _dist_ckpt()
    from megatron.core.dist_checkpointing.validation import StrictHandling

    dc = _dist_ckpt()
    saved = dc.load_tensors_metadata(str(directory))
    rows = {k: t.global_shape[0] for k, t in saved.items() if k in VOCAB_KEYS}
    if vocab_size is not None and any(n < vocab_size for n in rows.values()):
        raise Refusal(f"{directory} has {min(rows.values())} vocabulary rows, fewer than the "
                      f"architecture's vocab_size={vocab_size}: it is another model's "
                      "checkpoint; name the config.json that describes it")
    sharded = model.sharded_state_dict()
    if retarget is not None:
        retarget(sharded)
    wrong = [(t.key, tuple(saved[t.key].global_shape), tuple(t.global_shape))
             for t in sharded.values() if hasattr(t, "global_shape") and t.key in saved
             and t.key not in VOCAB_KEYS
             and tuple(saved[t.key].global_shape) != tuple(t.global_shape)]
    if wrong:
        k, have, want = wrong[0]
        raise Refusal(f"{directory} does not hold the architecture it was read with: {k} is "
                      f"{list(have)} there, {list(want)} in the model ({len(wrong)} tensors "
                      "differ); for a Megatron-LM checkpoint name the model's own config.json "
                      "(*_hf_config)")
    # megatron's words: "unexpected" = the model asks, the checkpoint lacks; "missing" = the
    # checkpoint has, the model does not ask
    state, in_ckpt_only, in_model_only = dc.load(sharded, str(directory),
                                                 strict=StrictHandling.RETURN_ALL)
    for k in interop.COMMON_STATE_KEYS:
        state.pop(k, None)
    in_ckpt_only = [k for k in in_ckpt_only if not k.startswith(interop.TRAINING_STATE_PREFIXES)]
    check_key_mismatch(directory, sorted(in_model_only), sorted(in_ckpt_only))
    for k in VOCAB_KEYS:  # rows past the checkpoint's were not loaded: zero, not leftovers
        if k in state and k in rows and k in sharded:
            first = rows[k] - sharded[k].global_offset[0]
            if first < state[k].shape[0]:
                state[k][max(first, 0):].zero_()
    result = model.load_state_dict(state, strict=False)
    check_key_mismatch(directory, result.missing_keys, result.unexpected_keys)


def check_key_mismatch(directory, model_only: list[str], ckpt_only: list[str]) -> None:
    bad_model = [k for k in model_only if not _spec_only(k)]
    bad_ckpt = [k for k in ckpt_only if not _spec_only(k)]
    if bad_model or bad_ckpt:
        def show(keys):
            return f"{keys[:4]}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
        raise MissingKey(
            f"{directory} does not match the model built from its manifest's architecture: "
            + (f"the model needs {show(bad_model)} that the checkpoint lacks" if bad_model else "")
            + ("; " if bad_model and bad_ckpt else "")
            + (f"the checkpoint holds {show(bad_ckpt)} the model has no place for" if bad_ckpt
               else "")
            + ". Point the stage at the checkpoint's own stage folder (its manifest.json "
              "describes it), or re-run the stage that wrote it")


def materializer(meta_model, arch: Arch, reader: HFReader, dtype: torch.dtype, bar: tqdm):
    """`materialize(sharded_key, global_offset, sizes)` for `save_streaming`: the chunk of a
    megatron tensor, computed from the HF tensors it is made of (mapping.py)."""
    rules = mapping.rule_by_megatron(arch)
    by_key = {}  # sharded key (layer- and expert-less) -> (rule, leading axes: layer, expert)
    for name, sh in meta_model.sharded_state_dict().items():
        if _spec_only(name):
            continue
        layer, pattern = mapping.split_layer_name(name)
        expert, pattern = mapping.split_expert_name(mapping.TE_PARAM_ALIASES.get(pattern, pattern))
        if pattern == "output_layer.weight" and arch.tie_embeddings:
            pattern = "embedding.word_embeddings.weight"
        by_key[sh.key] = (rules[pattern], (layer is not None) + (expert is not None))
    hf_of = {m: hs for _, m, hs in mapping.expand(arch)}
    last = {"name": None, "tensor": None}  # gate and up halves of fc1 come in turn

    def materialize(key: str, offset: tuple, sizes: tuple) -> torch.Tensor:
        rule, lead = by_key[key]
        name = rule.megatron.format(i=offset[0], e=offset[1] if lead > 1 else None) if lead \
            else rule.megatron
        rest = slice(lead, None)
        if last["name"] != name:
            last["tensor"] = None  # free before reading the next one
            last["tensor"] = mapping.fuse(rule, [reader.get(h) for h in hf_of[name]],
                                          arch).to(dtype)
            last["name"] = name
        chunk = last["tensor"][tuple(slice(o, o + n) for o, n in zip(offset[rest], sizes[rest]))]
        bar.update()
        return chunk.reshape(sizes).clone()

    return materialize


def save_from_hf(arch: Arch, reader: HFReader, directory: Path, dtype: str, desc: str,
                 iteration: int = 0) -> None:
    """Write the HF tensors `reader` serves as a torch_dist checkpoint of `arch` at the runtime's
    TP/PP, streaming (see the module docstring); collective. The structure comes from a
    meta-device local-spec model: the keys it writes are the TE spec's too."""
    from recipes.lib import model as M  # lazy: megatron (this module is read by light stages)

    meta = M.build(arch, dtype=dtype, spec="local", meta=True)
    with tqdm(desc=desc, unit="chunk", disable=not runtime.is_rank0()) as bar:
        save_streaming(meta, directory, materializer(meta, arch, reader, M.DTYPES[dtype], bar),
                       iteration)


def save_pruned(model, arch: Arch, dest: Path, dtype: str) -> None:
    """A model ModelOpt pruned (any PP) as a torch_dist checkpoint of `arch` at
    dest/iter_0000000, at the student's own layout: gathered as HF tensors, then written with
    convert's streaming writer (any PP, even layers); dest/arch.json last (a tournament
    candidate's "done" mark). Collective."""
    from recipes.lib import model as M  # lazy: megatron (this module is read by light stages)

    hf = M.gather_hf(model, arch)
    staging = dest / "staging"

    def stage_hf():
        shutil.rmtree(staging, ignore_errors=True)  # a killed candidate's leftovers
        staging.mkdir(parents=True)
        write_hf(hf, staging, 2 << 30)

    runtime.on_rank0(stage_hf)
    hf = None  # free the gathered tensors before the streaming save
    runtime.barrier()
    save_from_hf(arch, HFReader(staging, mapping.hf_shapes(arch)),
                 interop.iteration_dir(dest, 0), dtype, "save")
    runtime.barrier()
    if runtime.is_rank0():
        shutil.rmtree(staging)
        (dest / "arch.json").write_text(json.dumps(arch.to_dict()) + "\n")
    runtime.barrier()


def write_hf(tensors: dict[str, torch.Tensor], out: Path, shard_bytes: int) -> list[str]:
    """Sharded safetensors + model.safetensors.index.json (HF's own naming)."""
    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = t, size + nbytes
    shards.append(cur)
    weight_map, files = {}, []
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        files.append(fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return files


def write_hf_model(tensors: dict[str, torch.Tensor], out: Path, arch: Arch, hf_config: dict,
                   tokenizer_src: Path | None, dtype: str, shard_bytes: int) -> list[str]:
    """An HF model folder `AutoModelForCausalLM.from_pretrained` loads as is: the weights
    (`write_hf`), config.json from `arch` over the source's HF config, the tokenizer files
    (without remote-code auto_map) and a generation config. Returns the weight files."""
    out = Path(out)
    files = write_hf(tensors, out, shard_bytes)
    cfg = {**arch.to_hf_config(hf_config), "dtype": dtype, "torch_dtype": dtype}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in TOKENIZER_FILES if tokenizer_src else ():
        if (Path(tokenizer_src) / name).is_file():
            (out / name).write_bytes((Path(tokenizer_src) / name).read_bytes())
    tc = out / "tokenizer_config.json"
    if tc.is_file() and "auto_map" in (tok_cfg := json.loads(tc.read_text())):
        tok_cfg.pop("auto_map")  # remote tokenizer code: not part of a plain export
        tc.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    if not (out / "generation_config.json").exists():
        (out / "generation_config.json").write_text(json.dumps(
            {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
             if hf_config.get(k) is not None}, indent=2) + "\n")
    return files


def write_sidecars(dst: Path, hf_config: dict | None, tokenizer_src: Path | None) -> None:
    """The HF config an export starts from (None: not written) and the tokenizer files (none
    for a Megatron-LM input named without an HF folder: exports then carry no tokenizer)."""
    if hf_config is not None:
        (Path(dst) / "hf_config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tok = Path(dst) / "tokenizer"
    tok.mkdir(exist_ok=True)
    for f in TOKENIZER_FILES if tokenizer_src else ():
        if (Path(tokenizer_src) / f).is_file():
            shutil.copy2(Path(tokenizer_src) / f, tok / f)
