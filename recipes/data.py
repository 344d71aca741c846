"""Stage `data`: text files / JSONL -> megatron indexed datasets (train, valid, test).

    python -m recipes.data --config conf/tiny.yaml run.dir=runs/x data.input=corpus/ \
        data.tokenizer=HF_DIR

A `.txt` file is one document; each line of a `.jsonl` file is one document (its
`data.text_field`). A directory is searched recursively for both. Documents are tokenised with the
teacher's HF tokenizer in `data.workers` processes, EOD (the tokenizer's eos) appended, and
assigned to splits by a seeded permutation of document indices (deterministic, document-level).
Memory does not grow with a document: a long one is tokenised in pieces of at most ~256k
characters, cut at a paragraph, line or word break, and streamed into the .bin file as one
sequence (its tokens can differ from a whole-document tokenisation only where a piece ends).
Output: <run.dir>/data/{train,valid,test}.{bin,idx} and a manifest with documents and tokens per
split.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recipes.lib import compat, config, stage
from recipes.lib.arch import read_hf_config
from recipes.lib.stage import StageDir, fingerprint, read_manifest, short

log = logging.getLogger("recipes.data")
SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    input: str
    """A .txt / .jsonl file or a directory of them."""
    tokenizer: str
    """HF folder with the teacher's tokenizer and config.json (its vocab_size is checked)."""
    output: str | None = None
    """Output folder; default <run.dir>/data."""
    text_field: str = "text"
    """JSONL field holding the document text."""
    split: str = "98,1,1"
    """train,valid,test proportions (documents)."""
    workers: int = 2
    """Tokeniser processes."""
    min_chars: int = 1
    """Documents shorter than this (after stripping) are skipped."""

    def __post_init__(self):
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts) \
                or sum(float(p) for p in parts) <= 0:
            raise ValueError(f"data.split={self.split!r}; give three non-negative proportions "
                             "train,valid,test such as 98,1,1")
        if self.workers < 1:
            raise ValueError("data.workers must be >= 1")

    @property
    def proportions(self) -> list[float]:
        p = [float(x) for x in self.split.split(",")]
        return [x / sum(p) for x in p]


def find_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
    else:
        raise FileNotFoundError(f"data.input={path} does not exist")
    bad = [f for f in files if f.suffix not in (".txt", ".jsonl")]
    if bad:
        raise ValueError(f"{bad[0]}: unsupported file type; use .txt (one document per file) or "
                         ".jsonl (one document per line)")
    if not files:
        raise ValueError(f"data.input={path} holds no .txt or .jsonl files")
    return files


CHUNK_CHARS = 1 << 18  # a long document is tokenised in pieces of at most ~256k characters


def iter_documents(files: list[Path], text_field: str, min_chars: int):
    """Yield each document as an iterator of text pieces of at most ~CHUNK_CHARS characters (a
    .txt file is read piece by piece, never whole)."""
    for f in files:
        try:
            if f.suffix == ".txt":
                if _has_chars(f, min_chars):
                    yield _read_pieces(f)
                continue
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{f}:{n}: not a JSON object with a "
                                         f"'{text_field}' field ({e}); fix the line or set "
                                         "data.text_field") from e
                    if not isinstance(text, str):
                        raise ValueError(f"{f}:{n}: '{text_field}' is {type(text).__name__} "
                                         f"{short(text, 40)}, not a string; fix or drop the line")
                    if len(text.strip()) >= min_chars:
                        yield _split(text)
        except UnicodeDecodeError as e:
            raise ValueError(f"{f} is not UTF-8 text ({e}); convert it or leave it out") from e


def _split(text: str):
    """Pieces of at most ~CHUNK_CHARS, cut after a paragraph break, else a line break, else a
    space (tokenisers split words there anyway), else hard."""
    while len(text) > CHUNK_CHARS:
        cut = CHUNK_CHARS
        for sep in ("\n\n", "\n", " "):
            at = text.rfind(sep, CHUNK_CHARS // 2, CHUNK_CHARS)
            if at >= 0:
                cut = at + len(sep)
                break
        yield text[:cut]
        text = text[cut:]
    yield text


def _read_pieces(f: Path):
    with open(f, encoding="utf-8") as fh:
        rest = ""
        while block := fh.read(CHUNK_CHARS):
            *whole, rest = _split(rest + block)
            yield from whole
        yield rest


def _has_chars(f: Path, min_chars: int) -> bool:
    """Whether a .txt file holds at least `min_chars` non-blank characters (read in blocks)."""
    n = 0
    with open(f, encoding="utf-8") as fh:
        while n < min_chars and (block := fh.read(CHUNK_CHARS)):
            n += len(block.strip())
    return n >= min_chars


def split_assignment(n_docs: int, proportions: list[float], seed: int) -> np.ndarray:
    """0/1/2 (train/valid/test) per document: a seeded permutation cut by the proportions;
    a non-zero proportion always gets at least one document when there are enough."""
    counts = [int(round(p * n_docs)) for p in proportions[1:]]
    counts = [max(c, 1) if p > 0 and n_docs >= 3 else c for c, p in zip(counts, proportions[1:])]
    order = np.random.default_rng(seed).permutation(n_docs)
    out = np.zeros(n_docs, dtype=np.int8)
    out[order[: counts[0]]] = 1
    out[order[counts[0]: counts[0] + counts[1]]] = 2
    return out


_TOK = None


def _init_worker(tokenizer_path: str) -> None:
    global _TOK
    from transformers import AutoTokenizer  # lazy: seconds; config checks import this module

    _TOK = AutoTokenizer.from_pretrained(tokenizer_path)


def _encode(text: str) -> np.ndarray:
    return np.asarray(_TOK(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def _pieces(docs):
    """(document number, is its last piece, text) for every piece of every document."""
    for i, pieces in enumerate(docs):
        cur = next(pieces)
        for nxt in pieces:
            yield i, False, cur
            cur = nxt
        yield i, True, cur


def _batched(it, n: int):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def run(cfg: config.Config) -> dict:
    c: DataConfig = cfg.data
    out = Path(c.output or Path(cfg.run.dir) / "data")
    files = find_files(Path(c.input))
    vocab_size = read_hf_config(Path(c.tokenizer))["vocab_size"]
    _init_worker(c.tokenizer)
    tok = _TOK
    eod = tok.eos_token_id
    if eod is None or eod >= vocab_size or len(tok) > vocab_size + 256:
        raise ValueError(f"tokenizer in {c.tokenizer} ({len(tok)} entries, eos={eod}) does not "
                         f"match the teacher's vocab_size={vocab_size}; use the teacher's own "
                         "tokenizer (data.tokenizer=<teacher HF folder>)")
    tok_files = [Path(c.tokenizer) / f for f in ("config.json", "tokenizer.json",
                                                 "tokenizer_config.json", "tokenizer.model")
                 if (Path(c.tokenizer) / f).is_file()]
    sdir = StageDir("data", out, fingerprint(c, {"seed": cfg.run.seed}), cfg.run.force,
                    inputs={"corpus": [Path(c.input), *files], "tokenizer": tok_files},
                    hash_files=True)
    if sdir.already_done():
        log.info("%s is complete (same inputs and config): skipping", out)
        return read_manifest(out)
    n_docs = sum(1 for _ in iter_documents(files, c.text_field, c.min_chars))
    if n_docs == 0:
        raise ValueError(f"data.input={c.input}: no documents of at least {c.min_chars} chars")
    assign = split_assignment(n_docs, c.proportions, cfg.run.seed)
    for i, name in enumerate(SPLITS):
        if c.proportions[i] > 0 and not (assign == i).any():
            raise ValueError(f"split '{name}' got no documents ({n_docs} documents, split "
                             f"{c.split}); add documents or set data.split with {name}=0")

    compat.apply()  # megatron after it (recipes/lib/compat.py)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402

    dtype = np.uint16 if vocab_size < 65500 else np.int32
    # tokens take itemsize bytes where the text took >= 2 bytes each (a generous estimate)
    tmp = sdir.begin(need=sum(f.stat().st_size for f in files) * np.dtype(dtype).itemsize // 2)
    builders = {s: IndexedDatasetBuilder(str(tmp / f"{s}.bin"), dtype=dtype) for s in SPLITS}
    docs, tokens = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    max_id = -1
    ctx = mp.get_context("spawn")
    bar = tqdm(total=n_docs, desc="tokenize", unit="doc")
    with ctx.Pool(c.workers, initializer=_init_worker, initargs=(c.tokenizer,)) as pool, bar:
        # bounded: at most 4 pieces per worker in flight (Pool.imap would read the whole
        # corpus into its queue); a document's pieces go straight to the .bin file
        doc_len = 0
        for batch in _batched(_pieces(iter_documents(files, c.text_field, c.min_chars)),
                              4 * c.workers):
            for (i, last, _), ids in zip(batch, pool.map(_encode, [t for *_, t in batch])):
                if ids.size:
                    max_id = max(max_id, int(ids.max()))
                if max_id >= vocab_size:
                    raise ValueError(f"document {i} has token id {max_id} >= vocab_size "
                                     f"{vocab_size}: tokenizer and teacher do not match")
                split = SPLITS[assign[i]]
                if last:
                    ids = np.append(ids, np.int32(eod))
                _write_piece(builders[split], ids, dtype)
                doc_len += ids.size
                if last:
                    _end_document(builders[split], doc_len)
                    docs[split] += 1
                    tokens[split] += doc_len
                    doc_len = 0
                    bar.update()
    for s, b in builders.items():
        b.finalize(str(tmp / f"{s}.idx"))
    (tmp / "config.yaml").write_text(config.to_yaml(cfg))
    log.info("documents %s, tokens %s", docs, tokens)
    return sdir.commit({"input": {"files": [str(f) for f in files]}, "tokenizer": str(Path(c.tokenizer).resolve()),
                         "vocab_size": vocab_size, "max_token_id": max_id, "eod": eod,
                         "dtype": np.dtype(dtype).name,
                         "documents": docs, "tokens": tokens,
                         "metrics": {"documents": sum(docs.values()),
                                     "tokens": sum(tokens.values())}})


def _write_piece(builder, ids: np.ndarray, dtype) -> None:
    """Append tokens of the current document to megatron's builder's .bin file (its public
    `data_file`); `_end_document` records them as one sequence and one document, exactly what
    `IndexedDatasetBuilder.add_document(tensor, [length])` writes, without holding the document."""
    builder.data_file.write(ids.astype(dtype, copy=False).tobytes(order="C"))


def _end_document(builder, length: int) -> None:
    builder.sequence_lengths.append(length)
    builder.document_indices.append(len(builder.sequence_lengths))


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "data", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
