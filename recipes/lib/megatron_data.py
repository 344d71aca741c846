"""Existing Megatron indexed datasets (`<prefix>.bin` / `<prefix>.idx`, as Megatron-LM's
preprocess_data.py writes them) as data for our stages, without copying a token.

A prefix has no splits of its own. `import_prefix` makes it a data stage folder: its documents
are cut into train / valid / test by the split proportions, in order (the first documents train,
then valid, then test: Megatron's own split string does the same), and each split is an index
file of its own whose sequence pointers point into the original .bin (each split's `.bin` is a
symbolic link to it). Before that, both files are checked in full, each problem named in one
line (`check`): the .idx's header (magic, version, dtype), its size for the counts it declares,
its sequence lengths, pointers and document boundaries against each other and against the
.bin's size; then every token id of the .bin against the model's vocabulary, memory-mapped and
vectorised a chunk of SCAN_TOKENS at a time (docs/data.md gives the cost). The manifest says
what was checked, and how the splits were chosen.

In `distill.data` / `teacher_correction.data` / `prune.data` a prefix is imported on first use
into <run.dir>/data_import/<name> (`as_folders`; a prefix changed since is refused, and redone
with run.force=true); a Megatron-LM-style blend
["0.7", "/data/a_text_document", "0.3", "/data/b_text_document"] gives the weights
(`parse_blend`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import time
from pathlib import Path

import numpy as np

from recipes.lib import runtime
from recipes.lib.stage import StageDir, fingerprint, read_manifest
from recipes.lib.errors import OutputExists, Refusal

SCAN_TOKENS = 1 << 26  # token ids checked per vectorised step (256 MB of int32)
IMPORT_SPLIT = "98,1,1"  # of a prefix named directly in a training / prune stage


INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron/core/datasets/indexed_dataset.py, version 1
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
               np.float32: 7, np.uint16: 8}


def write_index(path: Path, dtype, lengths, document_indices, pointers=None) -> None:
    """A megatron .idx file (the format of megatron's _IndexWriter, read back by its
    IndexedDataset in the tests): the sequences' lengths, their byte offsets in the .bin
    (default: back to back from byte 0) and the document boundaries ([0, ..., n])."""
    lengths = np.asarray(lengths, dtype=np.int32)
    if pointers is None:
        ends = np.cumsum(lengths, dtype=np.int64) * np.dtype(dtype).itemsize
        pointers = np.concatenate([[0], ends[:-1]]) if len(lengths) else ends
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[dtype])
                + struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(docs)))
        f.write(lengths.tobytes() + np.asarray(pointers, dtype=np.int64).tobytes()
                + docs.tobytes())


def is_prefix(path: str | Path) -> bool:
    return Path(f"{path}.bin").is_file() and Path(f"{path}.idx").is_file()


def parse_blend(entries: list) -> tuple[list, list | None]:
    """(paths, weights or None) of a data list: plain paths, or Megatron-LM's alternating
    [weight, path, weight, path, ...]."""
    def number(x):
        try:
            return float(x) if not isinstance(x, bool) else None
        except (TypeError, ValueError):
            return None

    if len(entries) >= 2 and len(entries) % 2 == 0 and all(
            number(w) is not None for w in entries[0::2]) and all(
            number(p) is None for p in entries[1::2]):
        return [str(p) for p in entries[1::2]], [number(w) for w in entries[0::2]]
    return [str(e) for e in entries], None


def read_index(prefix: str, key: str) -> dict:
    """The .idx of `prefix` read and checked against itself and the .bin: {dtype, lengths,
    pointers, documents} (memory-mapped), or a Refusal naming the file and what is wrong."""
    f = Path(f"{prefix}.idx")
    size, head = f.stat().st_size, 9 + 8 + 1 + 8 + 8

    def bad(what: str) -> Refusal:
        return Refusal(f"{key}={prefix}: {f} {what}; re-copy it (or re-run Megatron-LM's "
                       "preprocess_data.py)")

    with open(f, "rb") as fh:
        header = fh.read(head)
    if len(header) < head or header[:9] != INDEX_HEADER:
        raise bad("is not a Megatron index (no MMIDIDX header)" if header[:9] != INDEX_HEADER
                  else f"is cut: {size} bytes, shorter than its header")
    version, code, n_seq, n_docs = struct.unpack("<QBQQ", header[9:])
    dtypes = {v: k for k, v in DTYPE_CODES.items()}
    if version != 1 or code not in dtypes:
        raise bad(f"has version {version} / dtype code {code}: not Megatron's format 1")
    want = head + n_seq * (4 + 8) + n_docs * 8
    if size != want:
        raise bad(f"is {size} bytes where its header's {n_seq} sequences and {n_docs - 1} "
                  f"documents need {want}: cut or damaged")
    lengths = np.memmap(f, np.int32, "r", head, (n_seq,))
    pointers = np.memmap(f, np.int64, "r", head + 4 * n_seq, (n_seq,))
    docs = np.memmap(f, np.int64, "r", head + 12 * n_seq, (n_docs,))
    item = np.dtype(dtypes[code]).itemsize
    if n_docs < 1 or docs[0] != 0 or docs[-1] != n_seq or (np.diff(docs) < 0).any():
        raise bad("has document boundaries that do not run from 0 to its sequence count")
    for i in range(0, n_seq, SCAN_TOKENS // 4):  # bounded memory: 16M sequences at a time
        ln, pt = lengths[i: i + SCAN_TOKENS // 4 + 1], pointers[i: i + SCAN_TOKENS // 4 + 1]
        if (ln < 0).any() or pt[0] < 0 or (pt[1:] < pt[:-1] + ln[:-1].astype(np.int64) * item) \
                .any():
            raise bad(f"has sequence pointers that overlap or precede the file (sequences "
                      f"{i:,} to {i + len(ln) - 1:,})")
    end = int(pointers[-1]) + int(lengths[-1]) * item if n_seq else 0
    bin_size = Path(f"{prefix}.bin").stat().st_size
    if bin_size != end:
        raise Refusal(f"{key}={prefix}: {prefix}.bin is {bin_size} bytes, its .idx describes "
                      f"{end}: a truncated or mismatched pair; re-copy both files")
    return {"dtype": dtypes[code], "lengths": lengths, "pointers": pointers, "documents": docs}


def check(prefix: str, idx: dict, vocab_size: int, key: str) -> dict:
    """Every token id of the prefix's .bin inside the vocabulary (`idx`: its read_index); what
    was checked (the manifest's)."""
    tokens = np.memmap(f"{prefix}.bin", dtype=idx["dtype"], mode="r")
    top, low = -1, 0
    for i in range(0, len(tokens), SCAN_TOKENS):
        chunk = tokens[i: i + SCAN_TOKENS]
        top, low = max(top, int(chunk.max())), min(low, int(chunk.min()))
        if top >= vocab_size or low < 0:
            j = i + int(np.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0])
            seq = int(np.searchsorted(idx["pointers"], j * tokens.itemsize, "right")) - 1
            doc = int(np.searchsorted(idx["documents"], seq, "right")) - 1
            raise Refusal(f"{key}={prefix} holds token id {int(tokens[j])} (token {j:,}, "
                          f"document {doc:,}), outside the model's vocabulary ({vocab_size}): "
                          "it was tokenised for another model; re-tokenise it with the "
                          "teacher's tokenizer")
    return {"max_token_id": top, "checked_tokens": int(len(tokens)),
            "bytes": int(tokens.nbytes), "index": "checked in full"}


def import_prefix(prefix: str, idx: dict, out: Path, proportions: list[float]) -> dict:
    """Split files for `prefix` (`idx`: its read_index) in folder `out` (which exists): per
    split an index of its documents pointing into the original .bin (symlinked); returns
    documents and tokens per split, for the manifest."""
    docs = np.asarray(idx["documents"])
    n = len(docs) - 1
    cuts = np.round(np.cumsum([0.0, *proportions]) * n).astype(np.int64)
    out_docs, out_tokens = {}, {}
    for split, d0, d1 in zip(("train", "valid", "test"), cuts[:-1], cuts[1:]):
        s0, s1 = int(docs[d0]), int(docs[d1])
        lengths = np.asarray(idx["lengths"][s0:s1])
        write_index(out / f"{split}.idx", idx["dtype"], lengths, docs[d0:d1 + 1] - docs[d0],
                    np.asarray(idx["pointers"][s0:s1]))
        os.symlink(Path(f"{prefix}.bin").resolve(), out / f"{split}.bin")
        out_docs[split] = int(d1 - d0)
        out_tokens[split] = int(lengths.astype(np.int64).sum())
    return {"documents": out_docs, "tokens": out_tokens, "dtype": np.dtype(idx["dtype"]).name}


def import_name(prefix: str) -> str:
    p = Path(prefix).resolve()
    return f"{p.name}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"


@dataclasses.dataclass
class Import:
    """What an import's result depends on (its fingerprint)."""
    prefix: str
    proportions: list
    vocab_size: int
    eod: int


def import_stage(prefix: str, out: Path, proportions: list[float], vocab_size: int, eod: int,
                 tokenizer: str | None, key: str, force: bool = False, extra: dict | None = None):
    """`prefix` as a finished data stage folder at `out` (made once; reused while the prefix's
    files are unchanged, refused when they changed unless `force`, which redoes it then):
    checked, split, committed with a manifest like the data stage's."""
    files = [Path(f"{prefix}.bin"), Path(f"{prefix}.idx")]
    spec = Import(prefix=str(Path(prefix).resolve()), proportions=proportions,
                  vocab_size=vocab_size, eod=eod)
    # the prefix is signed by size and mtime: hashing a corpus of this size is what importing
    # without copying avoids
    sdir = StageDir("data", out, fingerprint(spec, extra), False, inputs={"prefix": files})
    try:
        if sdir.already_done():
            return read_manifest(out)
    except OutputExists:
        if not force:
            raise
        sdir = StageDir("data", out, fingerprint(spec, extra), True, inputs={"prefix": files})
        sdir.already_done()
    idx = read_index(prefix, key)
    checked = check(prefix, idx, vocab_size, key)
    tmp = sdir.begin()
    res = import_prefix(prefix, idx, tmp, proportions)
    return sdir.commit({
        "input": {"prefix": spec.prefix}, "tokenizer": tokenizer, "vocab_size": vocab_size,
        "max_token_id": checked["max_token_id"], "eod": eod, "dtype": res["dtype"],
        "documents": res["documents"], "tokens": res["tokens"], "loss_mask": False,
        "import": {**checked, "splits": "documents in order: the first train, then valid, "
                   "then test, by the proportions " + ",".join(f"{p:g}" for p in proportions),
                   "copied": False},
        "metrics": {"documents": sum(res["documents"].values()),
                    "tokens": sum(res["tokens"].values())}})


def as_folders(entries: list[str], run_dir: str | Path, vocab_size: int, eod, key: str,
               force: bool = False, wait_s: float = 1800) -> list[str]:
    """Data entries with each Megatron prefix replaced by its import under
    <run_dir>/data_import/ (made on first use by rank 0; the other ranks wait for it); stage
    folders as they are. `eod`: the model's eos id (an int, a list of them, or None); `force`
    (run.force): a changed prefix is imported again instead of refused."""
    out = []
    for e in entries:
        if is_prefix(e) and not (Path(e) / "manifest.json").is_file():
            folder = Path(run_dir) / "data_import" / import_name(e)
            props = [float(x) for x in IMPORT_SPLIT.split(",")]
            eod = eod[0] if isinstance(eod, list) and eod else eod
            if runtime.rank() == 0:
                import_stage(e, folder, [p / sum(props) for p in props], vocab_size,
                             -1 if eod is None else int(eod), None, key, force)
            else:
                deadline = time.time() + wait_s
                while not (folder / "manifest.json").is_file() and time.time() < deadline:
                    time.sleep(1)
            e = str(folder)
        out.append(e)
    return out
