"""Fixed-length token windows from the data stage's indexed datasets (calibration, held-out
loss). A split's documents lie back to back in its .bin file (EOD between them); windows of
`seq_length + 1` tokens are cut at aligned offsets and chosen by a seeded permutation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recipes.lib import compat
from recipes.lib.stage import read_manifest


def split_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    compat.apply()
    # lazy: megatron after compat.apply(); plan and config checks import this module
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(Path(data_dir) / split)
    dtype = IndexedDataset(prefix).index.dtype
    return np.memmap(prefix + ".bin", dtype=dtype, mode="r")


def data_manifest(data_dir: str | Path, vocab_size: int, key: str) -> dict:
    """The manifest of a data stage folder (`key`: the config key naming it), checked against
    the vocabulary of the model that will read it."""
    m = read_manifest(data_dir, ("data",), key)
    if m.get("vocab_size") != vocab_size or m.get("max_token_id", -1) >= vocab_size:
        raise ValueError(
            f"{key}={data_dir} was tokenised with {m.get('tokenizer')} (vocab_size "
            f"{m.get('vocab_size')}, largest id {m.get('max_token_id')}), but the model has "
            f"vocab_size {vocab_size}: re-run the data stage with data.tokenizer=<the teacher's "
            "HF folder>")
    return m


def available_windows(n_tokens: int, seq_length: int) -> int:
    return n_tokens // (seq_length + 1)


def windows(data_dir: str | Path, split: str, seq_length: int, n: int, seed: int) -> torch.Tensor:
    """[n, seq_length + 1] int64 token windows (inputs = w[:, :-1], labels = w[:, 1:])."""
    toks = split_tokens(data_dir, split)
    avail = available_windows(len(toks), seq_length)
    if n > avail:
        raise ValueError(f"{split} split of {data_dir} has {len(toks)} tokens = {avail} windows of "
                         f"{seq_length + 1}; {n} requested. Use fewer samples, a shorter "
                         "seq_length, or more data")
    idx = np.sort(np.random.default_rng(seed).permutation(avail)[:n])
    w = seq_length + 1
    return torch.from_numpy(np.stack([np.asarray(toks[i * w:(i + 1) * w]) for i in idx])
                            .astype(np.int64))
