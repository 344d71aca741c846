"""Fixed-length token windows from the data stage's indexed datasets (calibration, held-out
loss). A split's documents lie back to back in its .bin file (EOD between them); windows of
`seq_length + 1` tokens are cut at aligned offsets and chosen by a seeded permutation."""
from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import numpy as np
import torch

from recipes.lib import compat
from recipes.lib.stage import read_manifest, short
from recipes.lib.errors import Refusal


def split_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    """The tokens of a split, back to back (a memmap): from byte 0 of its .bin for the data
    stage's own output, from the split's first document for an imported Megatron dataset
    (recipes/lib/megatron_data.py: its .bin is the whole original)."""
    compat.apply()
    # lazy: megatron after compat.apply(); plan and config checks import this module
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(Path(data_dir) / split)
    idx = IndexedDataset(prefix).index
    count = int(np.asarray(idx.sequence_lengths, dtype=np.int64).sum())
    if count == 0:
        return np.zeros(0, dtype=idx.dtype)
    return np.memmap(prefix + ".bin", dtype=idx.dtype, mode="r",
                     offset=int(idx.sequence_pointers[0]), shape=(count,))


def data_manifest(data_dir: str | Path, vocab_size: int, key: str) -> dict:
    """The manifest of a data stage folder (`key`: the config key naming it), checked against
    the vocabulary of the model that will read it."""
    m = read_manifest(data_dir, ("data",), key)
    if m.get("vocab_size") != vocab_size or m.get("max_token_id", -1) >= vocab_size:
        raise Refusal(
            f"{key}={data_dir} was tokenised with {m.get('tokenizer')} (vocab_size "
            f"{m.get('vocab_size')}, largest id {m.get('max_token_id')}), but the model has "
            f"vocab_size {vocab_size}: re-run the data stage with data.tokenizer=<the teacher's "
            "HF folder>")
    return m


def loss_coverage(data_dir: str | Path, manifest: dict, seq_length: int,
                  windows: int = 4096) -> tuple[float, float]:
    """(the fraction of the train split's tokens whose loss mask is 1, the fraction of its
    first `windows` windows of seq_length + 1 tokens without one): the manifest's count where
    the data stage recorded it, else the mask file read in chunks."""
    mask = np.memmap(Path(data_dir) / "train_mask.bin", dtype=np.uint8, mode="r")
    total = max(int(manifest["tokens"]["train"]), 1)
    ones = manifest.get("loss_tokens", {}).get("train")
    if ones is None:
        ones = sum(int(np.count_nonzero(mask[i: i + (1 << 26)]))
                   for i in range(0, len(mask), 1 << 26))
    n = min(windows, len(mask) // (seq_length + 1))
    per = np.asarray(mask[: n * (seq_length + 1)]).reshape(n, seq_length + 1)[:, 1:].sum(1)
    return ones / total, float((per == 0).mean()) if n else 0.0


def available_windows(n_tokens: int, seq_length: int) -> int:
    return n_tokens // (seq_length + 1)


def windows(data_dir: str | Path, split: str, seq_length: int, n: int, seed: int) -> torch.Tensor:
    """[n, seq_length + 1] int64 token windows (inputs = w[:, :-1], labels = w[:, 1:])."""
    toks = split_tokens(data_dir, split)
    avail = available_windows(len(toks), seq_length)
    if n > avail:
        raise Refusal(f"{split} split of {data_dir} has {len(toks)} tokens = {avail} windows of "
                      f"{seq_length + 1}; {n} requested. Use fewer samples, a shorter "
                      "seq_length, or more data")
    idx = np.sort(np.random.default_rng(seed).permutation(avail)[:n])
    w = seq_length + 1
    return torch.from_numpy(np.stack([np.asarray(toks[i * w:(i + 1) * w]) for i in idx])
                            .astype(np.int64))


# ---- tokenizers ----------------------------------------------------------------------------
UNKNOWN_MAX = 0.01      # more unknown tokens than this in a sample: not the text's tokenizer
ROUND_TRIP_MIN = 0.95   # decoded text at least this similar to the text (whitespace removed)
SAMPLE_CHARS = 4000     # characters of each sampled document that are checked


def check_tokenizer_files(path: Path, key: str) -> None:
    """An empty or unreadable tokenizer.json / tokenizer_config.json in HF folder `path` is
    refused naming the file (a stage that only copies them, convert, would pass it on)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        f = Path(path) / name
        if f.is_file() and f.stat().st_size == 0:
            raise Refusal(f"{key}: {f} is empty (0 bytes), a failed download or copy; "
                          "restore the model's tokenizer files")
        if f.is_file():
            try:
                json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise Refusal(f"{key}: {f} is not valid JSON ({e}); restore the model's "
                              "tokenizer files") from e


def load_tokenizer(path: str | Path, key: str):
    """The HF tokenizer in folder `path` (`key`: the config key naming it), its files checked
    first: an empty or unreadable tokenizer.json / tokenizer_config.json, and a tokenizer
    transformers cannot build, are refused naming the file and the fix."""
    from transformers import AutoTokenizer  # lazy: seconds; light stages import this module

    path = Path(path)
    check_tokenizer_files(path, key)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, named with the fix
        raise Refusal(f"{key}={path}: transformers cannot load its tokenizer "
                      f"({type(e).__name__}: {short(str(e), 200)}); point {key} at the "
                      "model's HF folder with its tokenizer files") from e


def check_tokenizer(tok, texts: list[str], vocab_size: int, name: str) -> dict:
    """Encode a sample of the real input with `tok` and refuse, naming the tokenizer (`name`)
    and a sample, when documents with text encode to no tokens, more than UNKNOWN_MAX of the
    tokens are unknown, decoding does not give the text back (whitespace removed), or ids fall
    outside the model's vocabulary. Returns what was checked (for the manifest)."""
    unk, n_tok, n_unk, checked = tok.unk_token_id, 0, 0, 0
    for text in texts:
        text = text[:SAMPLE_CHARS]
        if not text.strip():
            continue
        checked += 1
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise Refusal(f"the tokenizer {name} encodes text to no tokens ({short(text, 60)} "
                          "-> []): it is not the tokenizer this text and model need, or "
                          "transformers rebuilt it as another kind (check its "
                          "tokenizer_class); use the model's own tokenizer")
        if max(ids) >= vocab_size:
            raise Refusal(f"the tokenizer {name} gives id {max(ids)} for {short(text, 60)}, "
                          f"outside the model's vocabulary ({vocab_size}): use the model's "
                          "own tokenizer")
        unknown = ids.count(unk) if unk is not None else 0
        n_tok, n_unk = n_tok + len(ids), n_unk + unknown
        if unknown > UNKNOWN_MAX * len(ids):
            raise Refusal(f"the tokenizer {name} maps {unknown / len(ids):.1%} of a sample's "
                          f"tokens to its unknown token {tok.unk_token!r} (in "
                          f"{short(text, 60)}): it does not cover this text; use the "
                          "model's own tokenizer")
        back = tok.decode(ids, skip_special_tokens=True)
        a, b = re.sub(r"\s+", "", text), re.sub(r"\s+", "", back)
        if a != b and difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() < ROUND_TRIP_MIN:
            raise Refusal(f"the tokenizer {name} does not give the text back: "
                          f"{short(text, 60)} decodes to {short(back, 60)}; use the "
                          "model's own tokenizer (or one that covers this text)")
    return {"documents": checked, "tokens": n_tok,
            "unknown_fraction": round(n_unk / n_tok, 6) if n_tok else 0.0}


def chat_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """A chat rendered with the tokenizer's chat template, and the character spans of its
    assistant turns (their content and the end-of-turn text the template puts after it), found
    by rendering each prefix of the conversation (with the generation prompt before an
    assistant turn). A template whose rendering of a prefix is not a prefix of the whole (some
    drop earlier turns' reasoning) is refused: the mask could not be placed. What the template
    itself raises (turns it rejects) propagates: the data stage names the row."""
    def render(msgs, prompt=False):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt) \
            if msgs or prompt else ""

    full, spans = render(messages), []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:k], prompt=True), render(messages[:k + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise Refusal(f"the chat template of {tok.name_or_path} renders a conversation's "
                          "beginning differently from the whole conversation, so the "
                          "assistant turns cannot be located for the loss mask; use a "
                          "template without that (or single-turn chats)")
        spans.append((len(before), len(upto)))
    return full, spans


def encode_chat(tok, full: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """A chat's token ids and a 0/1 mask that is 1 on the assistant turns, from its rendering
    and their character spans (`chat_spans`), the characters mapped to tokens by offsets."""
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= (s + e) / 2 < b for a, b in spans)) for s, e in enc["offset_mapping"]]
    return np.asarray(enc["input_ids"], dtype=np.int32), np.asarray(mask, dtype=np.uint8)
