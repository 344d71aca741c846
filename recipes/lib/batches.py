"""The training data: megatron's GPTDataset over the data stage folders of a training config
(`datasets`: packed windows of seq_length + 1 tokens, a weighted blend across folders, the same
order for a given seed), and the micro-batches each data-parallel rank reads at a step
(`micro_batches`: global step s reads samples [s*G, (s+1)*G), G the global batch).

Chat data carries a loss mask (1 on assistant tokens) in <split>_mask.bin/.idx beside the
tokens, with the same sequence lengths (recipes/data.py). A second GPTDataset over the masks,
built with the same blend, seed and sizes, picks the same documents and offsets for every
sample, so sample i's mask is the mask of sample i's tokens; a text folder in the blend reads
as all ones (`_Ones`). The batches' loss_mask is the product, which both KD and LM losses
honour."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recipes.lib import compat
from recipes.lib.stage import read_manifest
from recipes.lib.train_config import TrainConfig

compat.importable()  # megatron's import needs triton or its stand-in; apply() at use
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: E402
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402

ONES = "#ones"  # a blend path suffix: this folder's tokens, read as a loss mask of ones


class _Tok:
    """What GPTDataset needs of a tokenizer (the data stage already tokenised)."""

    def __init__(self, eod: int, vocab_size: int):
        # pad: megatron's own "no pad token" id (packed windows are never padded); eod would
        # collide with a special token and megatron would replace it with this, warning
        self.eod, self.vocab_size, self.pad = eod, vocab_size, -1
        # megatron hashes this into the dataset cache key
        self.unique_identifiers = {"class": "pretokenized", "eod": eod, "vocab_size": vocab_size}


def datasets(c: TrainConfig, seed: int, cache: Path):
    """The train and valid datasets of `c.data` (a weighted blend of data stage folders), sized
    for c.train_iters and c.eval_iters global batches; megatron caches its indices in `cache`.
    With chat data among them, each sample's loss_mask is its tokens' mask."""
    manifests = [read_manifest(d) for d in c.data]
    masked = [m.get("loss_mask", False) for m in manifests]
    train, valid = _build(GPTDataset, c, seed, cache, lambda d, split: str(Path(d) / split),
                          manifests[0])
    if not any(masked):
        return train, valid
    flag = dict(zip(c.data, masked))
    mask_train, mask_valid = _build(
        _MaskDataset, c, seed, cache / "mask", lambda d, split: str(Path(d) / f"{split}_mask")
        if flag[d] else str(Path(d) / split) + ONES, manifests[0])
    return _Masked(train, mask_train), _Masked(valid, mask_valid)


def _build(cls, c: TrainConfig, seed: int, cache: Path, path, first: dict):
    """megatron's datasets of class `cls` over `path(folder, split)` of every data folder."""
    weights = [float(w) for w in (c.data_weights or [1.0] * len(c.data))]
    blend = lambda split: ([path(d, split) for d in c.data], weights)  # noqa: E731
    cfg = GPTDatasetConfig(
        random_seed=seed, sequence_length=c.seq_length,
        blend_per_split=[blend("train"), blend("valid"), None],
        tokenizer=_Tok(first["eod"], first["vocab_size"]), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        path_to_cache=str(cache), mmap_bin_files=True)
    sizes = [c.train_iters * c.global_batch_size, c.eval_iters * c.global_batch_size, None]
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, cfg).build()
    return train, valid


class _Ones:
    """A tokens index read as all ones: the loss mask of a text folder in a chat blend."""

    def __init__(self, ds):
        self._ds = ds

    def __getattr__(self, name):
        return getattr(self._ds, name)

    def __len__(self) -> int:
        return len(self._ds)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        n = int(self._ds.sequence_lengths[idx]) - offset if length is None else length
        return np.ones(n, dtype=np.uint8)


class _MaskDataset(GPTDataset):
    """GPTDataset over loss masks; a path ending in ONES is a folder's tokens read as ones."""

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig):
        if dataset_path.endswith(ONES):
            return _Ones(GPTDataset.build_low_level_dataset(dataset_path[:-len(ONES)], config))
        return GPTDataset.build_low_level_dataset(dataset_path, config)


class _Masked(torch.utils.data.Dataset):
    """Samples of `data` with loss_mask times the mask of the same sample (its labels)."""

    def __init__(self, data, mask):
        self.data, self.mask = data, mask

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        s = dict(self.data[i])
        s["loss_mask"] = s["loss_mask"] * torch.as_tensor(self.mask[i]["labels"]).to(
            s["loss_mask"].dtype)
        return s


def micro_batches(ds, step: int, c: TrainConfig, n_micro: int) -> list[dict]:
    """This data-parallel rank's micro-batches of global step `step`."""
    r = ps.get_data_parallel_rank()
    base = step * c.global_batch_size + r * n_micro * c.micro_batch_size
    out = []
    for m in range(n_micro):
        items = [ds[base + m * c.micro_batch_size + i] for i in range(c.micro_batch_size)]
        out.append({k: torch.stack([torch.as_tensor(x[k]) for x in items])
                    for k in ("tokens", "labels", "loss_mask", "position_ids")})
    return out
