"""The training data: megatron's GPTDataset over the data stage folders of a training config
(`datasets`: packed windows of seq_length + 1 tokens, a weighted blend across folders, the same
order for a given seed), and the micro-batches each data-parallel rank reads at a step
(`micro_batches`: global step s reads samples [s*G, (s+1)*G), G the global batch)."""
from __future__ import annotations

from pathlib import Path

import torch

from recipes.lib import compat
from recipes.lib.stage import read_manifest
from recipes.lib.train import TrainConfig

compat.apply()  # before megatron, which hard-codes CUDA (recipes/lib/compat.py)
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: E402
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402


class _Tok:
    """What GPTDataset needs of a tokenizer (the data stage already tokenised)."""

    def __init__(self, eod: int, vocab_size: int):
        # pad: megatron's own "no pad token" id (packed windows are never padded); eod would
        # collide with a special token and megatron would replace it with this, warning
        self.eod, self.vocab_size, self.pad = eod, vocab_size, -1
        # megatron hashes this into the dataset cache key
        self.unique_identifiers = {"class": "pretokenized", "eod": eod, "vocab_size": vocab_size}


def datasets(c: TrainConfig, seed: int, cache: Path):
    """The train and valid GPTDatasets of `c.data` (a weighted blend of data stage folders),
    sized for c.train_iters and c.eval_iters global batches; megatron caches its indices in
    `cache`."""
    first = read_manifest(c.data[0])
    weights = [float(w) for w in (c.data_weights or [1.0] * len(c.data))]
    blend = lambda split: ([str(Path(d) / split) for d in c.data], weights)  # noqa: E731
    cfg = GPTDatasetConfig(
        random_seed=seed, sequence_length=c.seq_length,
        blend_per_split=[blend("train"), blend("valid"), None],
        tokenizer=_Tok(first["eod"], first["vocab_size"]), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        path_to_cache=str(cache), mmap_bin_files=True)
    sizes = [c.train_iters * c.global_batch_size, c.eval_iters * c.global_batch_size, None]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, cfg).build()
    return train, valid


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
