"""Checkpoint I/O: HF safetensors folders in, megatron distributed checkpoints (torch_dist)
between stages, and the sidecars every checkpoint folder of ours carries:

    <stage>/checkpoint/       megatron dist checkpoint (loadable at any TP/PP)
    <stage>/hf_config.json    the source HF config (token ids etc. for export)
    <stage>/tokenizer/        the source tokenizer files
    <stage>/manifest.json     with "arch": the architecture of the checkpoint
"""
from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from recipes.lib import compat
from recipes.lib.arch import Arch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: {**v, "start": 8 + n} for k, v in header.items()}


class HFReader:
    """Reads single tensors from an HF folder's safetensors shards with plain file reads (no
    mmap, so untouched weights never count towards this process's memory). The index and the
    presence of every shard and tensor are checked at construction, before any work."""

    def __init__(self, path: str | Path, needed: set[str]):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            weight_map = {k: "model.safetensors"
                          for k in safetensors_header(self.path / "model.safetensors")}
        else:
            raise FileNotFoundError(f"{self.path}: no model.safetensors or "
                                    "model.safetensors.index.json; convert .bin checkpoints to "
                                    "safetensors first (transformers: save_pretrained)")
        missing_files = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
        if missing_files:
            raise FileNotFoundError(f"{self.path}: shard(s) {missing_files} listed in the index "
                                    "are missing; re-download the checkpoint")
        missing = sorted(needed - set(weight_map))
        if missing:
            raise KeyError(f"{self.path}: tensors {missing[:5]}{'...' if len(missing) > 5 else ''}"
                           f" ({len(missing)} in all) are not in the checkpoint; config.json and "
                           "the weights disagree")
        self.weight_map = weight_map
        self._headers: dict[str, dict] = {}

    def files(self) -> list[Path]:
        return sorted({self.path / f for f in self.weight_map.values()})

    def get(self, name: str) -> torch.Tensor:
        fname = self.weight_map[name]
        if fname not in self._headers:
            self._headers[fname] = safetensors_header(self.path / fname)
        h = self._headers[fname][name]
        begin, end = h["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.path / fname, "rb") as f:
            f.seek(h["start"] + begin)
            f.readinto(buf)
        dtype = SAFETENSORS_DTYPES[h["dtype"]]
        if not buf:
            return torch.empty(h["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(h["shape"])


def _dist_ckpt():
    compat.apply()
    from megatron.core import dist_checkpointing

    return dist_checkpointing


def save(model, directory: Path) -> None:
    """Save the (possibly TP/PP-sharded) model as one torch_dist checkpoint; collective."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _dist_ckpt().save(model.sharded_state_dict(), str(directory))


def save_streaming(meta_model, directory: Path,
                   materialize: Callable[[str, tuple, tuple], torch.Tensor]) -> None:
    """Write a torch_dist checkpoint for `meta_model` (built on the meta device: structure only)
    without ever holding the model: megatron supplies the sharded keys, shapes and metadata; each
    chunk's data comes from `materialize(sharded_key, global_offset, chunk_sizes)` at the moment
    torch's serial writer reaches it, one chunk at a time. Collective; loads like `save`."""
    dc = _dist_ckpt()
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
            dcp.save(mcore_to_pyt_state_dict(sd, False), planner=planner,
                     storage_writer=dcp.FileSystemWriter(checkpoint_dir, thread_count=1,
                                                         sync_files=False))

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dc.save(meta_model.sharded_state_dict(), str(directory), sharded_strategy=StreamingStrategy())


def load(model, directory: Path) -> None:
    """Load a torch_dist checkpoint into `model` at whatever TP/PP it was built; collective."""
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise FileNotFoundError(f"{directory} is not a megatron distributed checkpoint "
                                "(no metadata.json); point at <stage>/checkpoint of a finished "
                                "stage")
    state = _dist_ckpt().load(model.sharded_state_dict(), str(directory))
    model.load_state_dict(state, strict=True)


def write_sidecars(dst: Path, hf_config: dict, tokenizer_src: Path) -> None:
    (Path(dst) / "hf_config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tok = Path(dst) / "tokenizer"
    tok.mkdir(exist_ok=True)
    for f in TOKENIZER_FILES:
        if (Path(tokenizer_src) / f).is_file():
            shutil.copy2(Path(tokenizer_src) / f, tok / f)


def copy_sidecars(src: Path, dst: Path) -> None:
    """A stage that transforms a checkpoint carries its input's HF config and tokenizer along."""
    shutil.copy2(Path(src) / "hf_config.json", Path(dst) / "hf_config.json")
    shutil.copytree(Path(src) / "tokenizer", Path(dst) / "tokenizer", dirs_exist_ok=True)


def read_arch(stage_dir: Path) -> Arch:
    from recipes.lib.stage import read_manifest

    m = read_manifest(stage_dir)
    if "arch" not in m:
        raise KeyError(f"{stage_dir}/manifest.json has no 'arch': not a checkpoint stage output")
    return Arch.from_dict(m["arch"])
