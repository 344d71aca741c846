"""Hugging Face weights in: the safetensors headers checked before any work, and `HFReader`,
which serves single tensors with plain file reads (no mmap: untouched weights never count
towards the reading process's memory; convert streams them into megatron's writer,
checkpoint.save_from_hf).

Checked before any work, each naming the file and the fix: every shard is a safetensors file
exactly as long as its header says; the index and the shards agree; every tensor config.json
implies is there with the shape config.json implies (mapping.hf_shapes); the weights hold no
layer past config.json's num_hidden_layers (which would otherwise be dropped without a word).
Other tensors convert does not read (rotary inv_freq buffers, ...) are named in a warning. Each
tensor read is checked for NaN / inf (`check_finite`; its cost is in docs/measured.md): a
damaged or diverged checkpoint fails its convert naming the tensor, instead of
pruning on NaN importance scores and failing at distillation's first step.
"""
from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path

import torch
from recipes.lib.errors import MissingInput, MissingKey, Refusal

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(path: Path) -> dict:
    """{tensor: {dtype, shape, data_offsets, start}} of a safetensors file, after checking that
    the file is one: not empty, not a Git-LFS pointer, a header that parses, every tensor's
    byte count matching its dtype and shape, and the file exactly as long as the header says
    (a truncated download fails here, naming the file and a tensor it cuts)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(b"version "):
            raise Refusal(f"{path} is a Git-LFS pointer, not weights: fetch the real files "
                          "(git lfs pull, or huggingface-cli download)")
        if len(head) < 8:
            raise Refusal(f"{path} is {size} bytes: empty or truncated; re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise Refusal(f"{path}: header of {n} bytes in a {size}-byte file: truncated or "
                          "not a safetensors file; re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Refusal(f"{path}: unreadable safetensors header ({e}); re-download it") from e
    header.pop("__metadata__", None)
    end = 0
    for name, h in header.items():
        dtype = SAFETENSORS_DTYPES.get(h.get("dtype"))
        begin, stop = h["data_offsets"]
        if dtype is None:
            raise Refusal(f"{path}: tensor {name} has dtype {h.get('dtype')!r}, which this "
                          f"recipe does not read ({sorted(SAFETENSORS_DTYPES)})")
        want = torch.Size(h["shape"]).numel() * dtype.itemsize
        if stop - begin != want:
            raise Refusal(f"{path}: tensor {name} spans {stop - begin} bytes, its shape "
                          f"{h['shape']} and dtype {h['dtype']} need {want}: corrupt file")
        if 8 + n + stop > size:
            raise Refusal(f"{path} is truncated: {size} bytes, but tensor {name} ends at byte "
                          f"{8 + n + stop}; re-download it")
        end = max(end, stop)
    if 8 + n + end != size:
        raise Refusal(f"{path} is {size} bytes, its header describes {8 + n + end}: "
                      "truncated or padded; re-download it")
    return {k: {**v, "start": 8 + n} for k, v in header.items()}


LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class HFReader:
    """Reads single tensors from an HF folder's safetensors shards with plain file reads (no
    mmap, so untouched weights never count towards this process's memory). `needed`: {tensor:
    the shape it must have}. The index, every shard and tensor and their shapes are checked at
    construction, before any work (the module doc)."""

    def __init__(self, path: str | Path, needed: dict[str, tuple[int, ...]]):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        headers = {}
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            headers["model.safetensors"] = safetensors_header(self.path / "model.safetensors")
            weight_map = dict.fromkeys(headers["model.safetensors"], "model.safetensors")
        else:
            raise MissingInput(f"{self.path}: no model.safetensors or "
                               "model.safetensors.index.json; convert .bin checkpoints to "
                               "safetensors first (transformers: save_pretrained)")
        missing_files = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
        if missing_files:
            raise MissingInput(f"{self.path}: shard(s) {missing_files} listed in the index "
                               "are missing; re-download the checkpoint")
        missing = sorted(set(needed) - set(weight_map))
        if missing:
            raise MissingKey(f"{self.path}: tensors {missing[:5]}{'...' if len(missing) > 5 else ''}"
                             f" ({len(missing)} in all) are not in the checkpoint; config.json and "
                             "the weights disagree")
        self.weight_map = weight_map
        # every shard's header is read and checked now, before any work (cheap: headers only)
        self._headers = {f: headers.get(f) or safetensors_header(self.path / f)
                         for f in sorted(set(weight_map.values()))}
        absent = sorted(n for n in needed if n not in self._headers[weight_map[n]])
        if absent:
            raise MissingKey(f"{self.path}: the index names {absent[:5]} but their shards do not "
                             "hold them; re-download the checkpoint")
        self._check_shapes_and_extras(needed)

    def _check_shapes_and_extras(self, needed: dict[str, tuple[int, ...]]) -> None:
        wrong = [(n, self._headers[self.weight_map[n]][n]["shape"], list(want))
                 for n, want in sorted(needed.items())
                 if self._headers[self.weight_map[n]][n]["shape"] != list(want)]
        if wrong:
            n, have, want = wrong[0]
            raise Refusal(f"{self.path}: {n} is {have} in the weights, config.json implies "
                          f"{want} ({len(wrong)} tensor(s) differ); config.json and the "
                          "weights disagree: use the config.json that came with them")
        layers = {int(m.group(1)) for n in needed if (m := LAYER.match(n))}
        beyond = sorted({int(m.group(1)) for n in self.weight_map if (m := LAYER.match(n))}
                        - layers)
        if beyond:
            raise Refusal(f"{self.path}: the weights hold layer(s) {beyond[:5]} beyond "
                          f"config.json's num_hidden_layers={len(layers)}, which would be "
                          "dropped; config.json and the weights disagree: use the config.json "
                          "that came with them")
        unused = sorted(n for n in set(self.weight_map) - set(needed)
                        if not n.endswith("rotary_emb.inv_freq"))  # buffers, recomputed
        if unused:
            log.warning("%s: %d tensor(s) not converted (the architecture has no place for "
                        "them): %s", self.path, len(unused), unused[:5])

    def get(self, name: str) -> torch.Tensor:
        fname = self.weight_map[name]
        h = self._headers[fname][name]
        begin, end = h["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.path / fname, "rb") as f:
            f.seek(h["start"] + begin)
            got = f.readinto(buf)
        if got != len(buf):  # the file shrank since it was checked
            raise Refusal(f"{self.path / fname}: tensor {name} read {got} of {len(buf)} "
                          "bytes; the file changed or is truncated")
        dtype = SAFETENSORS_DTYPES[h["dtype"]]
        if not buf:
            return torch.empty(h["shape"], dtype=dtype)
        t = torch.frombuffer(buf, dtype=dtype).reshape(h["shape"])
        check_finite(t, f"{self.path / fname}: tensor {name}")
        return t


def check_finite(t: torch.Tensor, what: str, chunk: int = 1 << 22) -> None:
    """Refuse a floating-point tensor holding NaN or inf. In chunks of 4M elements: the max of
    |x| propagates NaN, and a chunk's temporaries stay in cache (isfinite over a whole bf16
    tensor is 30x slower on a CPU)."""
    if not t.is_floating_point():
        return
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        if not torch.isfinite(flat[i:i + chunk].abs().amax()):
            bad = int((~torch.isfinite(flat)).sum())
            raise Refusal(f"{what} holds {bad} NaN / inf value(s) of {flat.numel()}: the "
                          "checkpoint is damaged or comes from a diverged run; re-download "
                          "it, or convert the last good one")


def hf_files(folder: Path) -> list[Path]:
    """The files of an HF model folder a stage reads (and the folder itself, for the overlap
    check): config.json, the safetensors index and shards, tokenizer files that exist."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        weights = [index, *shards]
    else:
        weights = sorted(folder.glob("*.safetensors"))
    extra = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()]
    return [folder, folder / "config.json", *[w for w in weights if w.exists()], *extra]
