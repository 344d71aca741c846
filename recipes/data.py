"""Stage `data`: text, JSONL (plain, .gz, .zst), Parquet or chat data -> megatron indexed
datasets (train, valid, test).

    python -m recipes.data --config conf/tiny.yaml run.dir=runs/x data.input=corpus/ \
        data.tokenizer=HF_DIR

Inputs (recipes/lib/documents.py): a `.txt` file is one document; each line of a `.jsonl`,
`.jsonl.gz` or `.jsonl.zst` file and each row of a `.parquet` file is one (`data.text_field`);
a directory is searched recursively and may mix them. A record with `messages` instead
(`data.messages_field`: [{role, content}, ...]) is a chat: rendered with the tokenizer's chat
template, its tokens carry a loss mask that is 1 on the assistant turns only, stored beside the
tokens (`<split>_mask.bin/.idx`) and honoured by distill's KD and LM losses and by
teacher_correction. A bad row is refused naming the file and the row, or skipped and counted
(`data.on_bad_row=skip`).
Before any work the tokenizer is checked on a sample of the real input (text that encodes to no
tokens, unknown tokens, text that does not decode back, ids outside the vocabulary: refused
naming the tokenizer and the sample), and a dataset whose documents encode to nothing is never
published. Documents are tokenised in batches of ~4 MB of text on `data.workers` threads, EOD
(the tokenizer's eos) appended, and assigned to splits by a seeded permutation of document
indices (deterministic, document-level). Memory does not grow with a document: a long one is
tokenised in pieces of at most ~256k characters cut at a paragraph, line or word break, and
streamed into the .bin file as one sequence. Output: <run.dir>/data/{train,valid,test}.{bin,idx}
and a manifest with documents and tokens per split.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recipes.lib import config, documents, megatron_data, stage, tokens
from recipes.lib.arch import read_hf_config
from recipes.lib.stage import StageDir, fingerprint, read_manifest
from recipes.lib.errors import Refusal

log = logging.getLogger("recipes.data")
SPLITS = ("train", "valid", "test")
EMPTY_MAX = 0.01   # more documents than this that encode to nothing: the dataset is refused
SAMPLE_DOCS = 32   # documents of the input the tokenizer is checked on before any work


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    input: str
    """A .txt / .jsonl / .jsonl.gz / .jsonl.zst / .parquet file, or a directory of them; or an
    existing Megatron dataset's prefix (<prefix>.bin / .idx), imported without copying."""
    tokenizer: str
    """HF folder with the teacher's tokenizer and config.json (its vocab_size is checked)."""
    output: str | None = None
    """Output folder; default <run.dir>/data."""
    text_field: str = "text"
    """JSONL field / Parquet column holding a document's text."""
    messages_field: str = "messages"
    """JSONL field / Parquet column holding a chat ([{role, content}, ...]) where a record has
    no text: rendered with the tokenizer's chat template, loss on the assistant turns only."""
    on_bad_row: str = "fail"
    """fail | skip: a row that is not a document (not JSON or not UTF-8, a lone surrogate, no
    field, null or not a string, malformed messages, a chat the template refuses)."""
    on_duplicate_file: str = "fail"
    """fail | skip: two input files with the same content (skip: read the first alone)."""
    split: str = "98,1,1"
    """train,valid,test proportions (documents)."""
    workers: int = 2
    """Tokeniser threads (the Rust tokenizer's batch encode)."""
    min_chars: int = 1
    """Documents shorter than this (after stripping) are skipped."""

    def __post_init__(self):
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts) \
                or sum(float(p) for p in parts) <= 0:
            raise Refusal(f"data.split={self.split!r}; give three non-negative proportions "
                          "train,valid,test such as 98,1,1")
        if self.workers < 1:
            raise Refusal("data.workers must be >= 1")
        for key in ("on_bad_row", "on_duplicate_file"):
            if getattr(self, key) not in ("fail", "skip"):
                raise Refusal(f"data.{key}={getattr(self, key)!r}; use fail or skip")

    @property
    def proportions(self) -> list[float]:
        p = [float(x) for x in self.split.split(",")]
        return [x / sum(p) for x in p]


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


def open_tokenizer(c: DataConfig):
    """The teacher's tokenizer (files checked), its model's vocab_size and its EOD id. Its batch
    encodes run on data.workers threads (the Rust tokenizer's thread pool, set before first
    use)."""
    os.environ["RAYON_NUM_THREADS"] = str(c.workers)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    vocab_size = read_hf_config(Path(c.tokenizer))["vocab_size"]
    tok = tokens.load_tokenizer(c.tokenizer, "data.tokenizer")
    eod = tok.eos_token_id
    if eod is None or eod >= vocab_size or len(tok) > vocab_size + 256:
        raise Refusal(f"tokenizer in {c.tokenizer} ({len(tok)} entries, eos={eod}) does not "
                      f"match the teacher's vocab_size={vocab_size}; use the teacher's own "
                      "tokenizer (data.tokenizer=<teacher HF folder>)")
    return tok, vocab_size, eod


def survey(reader: documents.Reader, tok, vocab_size: int, c: DataConfig) -> dict:
    """One pass over the input before any work: documents (chats among them), and the tokenizer
    checked on the first SAMPLE_DOCS documents (recipes/lib/tokens.py check_tokenizer; a chat
    needs a chat template and is encoded once)."""
    n_docs, n_chat, sample = 0, 0, []
    for doc in reader:
        n_docs += 1
        if doc.messages is not None:
            if n_chat == 0 and not tok.chat_template:
                raise Refusal(f"{doc.where} is a chat ('{c.messages_field}'), but the "
                              f"tokenizer {c.tokenizer} has no chat template: use the "
                              "instruct model's tokenizer, or give text instead")
            n_chat += 1
            if len(sample) < SAMPLE_DOCS:
                sample.append("\n".join(m["content"] for m in doc.messages))
        elif len(sample) < SAMPLE_DOCS:
            sample.append("".join(itertools.islice(doc.pieces, 1)))
    if n_docs == 0:
        raise Refusal(f"data.input={c.input}: no documents of at least {c.min_chars} chars")
    checked = tokens.check_tokenizer(tok, sample, vocab_size, c.tokenizer)
    return {"documents": n_docs, "chats": n_chat, "tokenizer_check": checked,
            "skipped_rows": dict(reader.skipped), "skipped_kinds": dict(reader.kinds)}


BATCH_CHARS = 4 << 20  # text per batch encode (bounded memory; ~16 pieces of the longest)


def _items(reader: documents.Reader):
    """(document number, is its last item, text piece or rendered chat) for every document: a
    chat as the reader's check rendered it, (text, assistant spans), not rendered again."""
    for i, doc in enumerate(reader):
        if doc.messages is not None:
            yield i, True, doc.rendered
            continue
        cur = next(doc.pieces)
        for nxt in doc.pieces:
            yield i, False, cur
            cur = nxt
        yield i, True, cur


def _batches(items, chars: int = BATCH_CHARS):
    """Runs of items of about `chars` characters of text (a chat: its rendering's)."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[2]) if isinstance(item[2], str) else len(item[2][0])
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode(tok, batch: list) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(ids, loss mask or None) of each item of a batch: the text pieces in one batch encode
    (the Rust tokenizer spreads it over data.workers threads), the chats one by one."""
    texts = [x for *_, x in batch if isinstance(x, str)]
    backend = getattr(tok, "backend_tokenizer", None)  # the Rust tokenizer tok() calls
    if not texts:
        ids = iter(())
    elif backend is not None:  # the same ids, without transformers' per-encoding conversion
        ids = (e.ids for e in backend.encode_batch(texts, add_special_tokens=False))
    else:
        ids = iter(tok(texts, add_special_tokens=False)["input_ids"])
    return [(np.array(next(ids), dtype=np.int32), None) if isinstance(x, str)
            else tokens.encode_chat(tok, *x) for *_, x in batch]


class Writer:
    """The split datasets being written in megatron's indexed format: tokens (and, for chat
    data, a loss mask of the same lengths), a document's pieces streamed into the .bin file as
    one sequence, without holding the document; the .idx written at the end
    (megatron_data.write_index)."""

    def __init__(self, tmp: Path, dtype, masks: bool):
        self.tmp, self.dtype = tmp, dtype
        self.bins = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}
        self.masks = {s: open(tmp / f"{s}_mask.bin", "wb") for s in SPLITS} if masks else None
        self.lengths: dict = {s: [] for s in SPLITS}
        self.loss_tokens = dict.fromkeys(SPLITS, 0)  # tokens whose mask is 1

    def piece(self, split: str, ids: np.ndarray, mask: np.ndarray | None) -> None:
        self.bins[split].write(ids.astype(self.dtype, copy=False).tobytes())
        if self.masks is not None:
            m = np.ones(ids.size, np.uint8) if mask is None else mask
            self.masks[split].write(m.astype(np.uint8, copy=False).tobytes())
            self.loss_tokens[split] += int(np.count_nonzero(m))

    def end_document(self, split: str, length: int) -> None:
        self.lengths[split].append(length)

    def finalize(self) -> None:
        for s in SPLITS:
            n = len(self.lengths[s])
            self.bins[s].close()
            megatron_data.write_index(self.tmp / f"{s}.idx", self.dtype, self.lengths[s],
                                      range(n + 1))
            if self.masks:
                self.masks[s].close()
                megatron_data.write_index(self.tmp / f"{s}_mask.idx", np.uint8,
                                          self.lengths[s], range(n + 1))


def tokenize(c: DataConfig, tok, reader, assign, n_docs: int, vocab_size: int, eod: int,
             writer: Writer) -> dict:
    """Every document into its split, a batch of pieces at a time; counts per split."""
    docs, toks = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    max_id, empty, doc_len = -1, 0, 0
    with tqdm(total=n_docs, desc="tokenize", unit="doc") as bar:
        for batch in _batches(_items(reader)):  # a document's pieces go straight to the .bin
            for (i, last, _), (ids, mask) in zip(batch, encode(tok, batch)):
                max_id = max(max_id, int(ids.max()) if ids.size else -1)
                if max_id >= vocab_size:
                    raise Refusal(f"document {i} has token id {max_id} >= vocab_size "
                                  f"{vocab_size}: tokenizer and teacher do not match")
                split = SPLITS[assign[i]]
                if last:  # EOD: a target of a text document, not of a chat's last turn
                    ids = np.append(ids, np.int32(eod))
                    mask = None if mask is None else np.append(mask, np.uint8(0))
                writer.piece(split, ids, mask)
                doc_len += ids.size
                if last:
                    writer.end_document(split, doc_len)
                    docs[split] += 1
                    toks[split] += doc_len
                    empty += doc_len == 1
                    doc_len = 0
                    bar.update()
    writer.finalize()
    return {"documents": docs, "tokens": toks, "max_token_id": max_id, "empty": empty}


def run(cfg: config.Config) -> dict:
    c: DataConfig = cfg.data
    out = Path(c.output or Path(cfg.run.dir) / "data")
    if megatron_data.is_prefix(c.input):  # an existing Megatron dataset: imported, not copied
        _, vocab_size, eod = open_tokenizer(c)
        return megatron_data.import_stage(
            c.input, out, c.proportions, vocab_size, eod, str(Path(c.tokenizer).resolve()),
            "data.input", cfg.run.force, {"seed": cfg.run.seed})
    found_files = documents.find_files(Path(c.input), c.on_duplicate_file)
    files = found_files.files
    for why, paths in found_files.skipped.items():
        log.info("skipped %d %s: %s%s", len(paths), why, ", ".join(map(str, paths[:3])),
                 ", ..." if len(paths) > 3 else "")
    tok, vocab_size, eod = open_tokenizer(c)
    tok_files = [Path(c.tokenizer) / f for f in ("config.json", "tokenizer.json",
                                                 "tokenizer_config.json", "tokenizer.model")
                 if (Path(c.tokenizer) / f).is_file()]
    sdir = StageDir("data", out, fingerprint(c, {"seed": cfg.run.seed}), cfg.run.force,
                    inputs={"corpus": [Path(c.input), *files], "tokenizer": tok_files},
                    hash_files=True)
    if sdir.already_done():
        log.info("%s is complete (same inputs and config): skipping", out)
        return read_manifest(out)
    reader = documents.Reader(files, c.text_field, c.messages_field, c.min_chars, c.on_bad_row,
                              check_chat=lambda m: tokens.chat_spans(tok, m) if tok.chat_template
                              else None)
    found = survey(reader, tok, vocab_size, c)
    n_docs = found["documents"]
    assign = split_assignment(n_docs, c.proportions, cfg.run.seed)
    for i, name in enumerate(SPLITS):
        if c.proportions[i] > 0 and not (assign == i).any():
            raise Refusal(f"split '{name}' got no documents ({n_docs} documents, split "
                          f"{c.split}); add documents or set data.split with {name}=0")
    dtype = np.uint16 if vocab_size < 65500 else np.int32
    # tokens take itemsize bytes where the text took >= 2 bytes each (a generous estimate)
    tmp = sdir.begin(need=sum(f.stat().st_size for f in files) * np.dtype(dtype).itemsize // 2)
    writer = Writer(tmp, dtype, found["chats"])
    res = tokenize(c, tok, reader, assign, n_docs, vocab_size, eod, writer)
    if res["empty"] > EMPTY_MAX * n_docs:
        raise Refusal(f"{res['empty']} of {n_docs} documents encoded to no tokens with the "
                      f"tokenizer {c.tokenizer}: the dataset is not published; use the "
                      "model's own tokenizer")
    (tmp / "config.yaml").write_text(config.to_yaml(cfg))
    log.info("documents %s, tokens %s%s", res["documents"], res["tokens"],
             f", {found['chats']} chats (loss on assistant turns)" if found["chats"] else "")
    return sdir.commit({
        "input": {"files": [str(f) for f in files],
                  "skipped": {k: len(v) for k, v in found_files.skipped.items() if v},
                  "skipped_paths": {k: [str(p) for p in v[:100]]
                                    for k, v in found_files.skipped.items() if v},
                  "duplicates": {str(k): str(v) for k, v in found_files.duplicates.items()}},
        "tokenizer": str(Path(c.tokenizer).resolve()),
        "vocab_size": vocab_size, "max_token_id": res["max_token_id"], "eod": eod,
        "dtype": np.dtype(dtype).name, "documents": res["documents"], "tokens": res["tokens"],
        "loss_mask": bool(found["chats"]), "chats": found["chats"],
        **({"loss_tokens": writer.loss_tokens} if found["chats"] else {}),
        "skipped_rows": found["skipped_rows"], "skipped_kinds": found["skipped_kinds"],
        "tokenizer_check": found["tokenizer_check"],
        "metrics": {"documents": sum(res["documents"].values()),
                    "tokens": sum(res["tokens"].values())}})


def main(argv: list[str] | None = None) -> int:
    return stage.main(run, "data", __doc__, argv, one_process=True)


if __name__ == "__main__":
    sys.exit(main())
