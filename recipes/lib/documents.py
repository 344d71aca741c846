"""Documents from the files a user brings, streamed so that memory stays flat as a file grows.

    .txt                          one document per file, read in pieces
    .jsonl / .jsonl.gz / .jsonl.zst   one document per line: a JSON object with the text field
                                  (`text`), or a chat with the messages field (`messages`: a list
                                  of {role, content})
    .parquet                      one document per row of the text column (or messages column),
                                  read one record batch at a time

A directory is searched recursively and may mix formats. What tools leave beside data is not
read, as pyarrow's and HF datasets' discovery does not: hidden files and folders and tool
markers (a name starting with "." or "_": .ipynb_checkpoints/, .git/, _SUCCESS, _temporary/,
Hadoop's .crc files), editor backups (name~), and files of no data format; `find_files` lists
them. Two files with the same content are refused (their documents would be published twice,
possibly in train and in test), or with `on_duplicate="skip"` the later one is left out.

A bad row (not JSON, not UTF-8, a lone surrogate in its text, no text or messages field, a null
or non-string cell, malformed messages, a chat its tokenizer's template refuses) is refused
naming the file and the row, or with `on_bad_row=skip` left out and counted per file and per
kind (`Reader.skipped`, `Reader.kinds`, in the manifest). A corrupt file (a truncated .gz, a
damaged Parquet footer) is refused naming the file; legal encodings are read (zstd frames with
long windows or skippable frames between them, gzip files of several members).
"""
from __future__ import annotations

import codecs
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

from recipes.lib.stage import short
from recipes.lib.errors import MissingInput, Refusal

FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
CHUNK_CHARS = 1 << 18  # a long document is tokenised in pieces of at most ~256k characters
PARQUET_BATCH = 1024   # rows per Parquet record batch read
TOOL_PREFIXES = (".", "_")  # hidden, or a tool's marker / scratch: pyarrow's ignore_prefixes
TOOL_SUFFIXES = (".crc", "~")  # Hadoop's checksums, editor backups
ZSTD_MAX_WINDOW = 1 << 31  # zstd --long=31, the largest window (the default limit: 2**27)
SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's \uXXXX escapes can leave half a pair


def file_format(path: Path) -> str | None:
    """The format a file's name says (the longest matching suffix), None for others."""
    name = path.name.lower()
    return max((f for f in FORMATS if name.endswith(f)), key=len, default=None)


@dataclasses.dataclass
class Found:
    """The data files of an input, and what was left out: {why: [paths]} (a skipped folder is
    one entry), and {duplicate: the earlier file with its content} for on_duplicate=skip."""
    files: list[Path]
    skipped: dict = dataclasses.field(default_factory=dict)
    duplicates: dict = dataclasses.field(default_factory=dict)


def find_files(path: Path, on_duplicate: str = "fail") -> Found:
    """The data files of `path` (a file, or a folder searched recursively without what tools
    leave beside data), sorted; two with the same content refused, or the later skipped."""
    skipped = defaultdict(list)
    if path.is_file():
        if not file_format(path):
            raise Refusal(f"{path}: unsupported file type; use {', '.join(FORMATS)}")
        files = [path]
    elif path.is_dir():
        files = []
        for top, dirs, names in os.walk(path):
            for d in sorted(dirs):
                if d.startswith(TOOL_PREFIXES):
                    skipped["hidden, or a tool's marker"].append(Path(top, d))
            dirs[:] = sorted(d for d in dirs if not d.startswith(TOOL_PREFIXES))
            for name in sorted(names):
                f = Path(top, name)
                if name.startswith(TOOL_PREFIXES) or name.endswith(TOOL_SUFFIXES):
                    skipped["hidden, or a tool's marker"].append(f)
                elif not file_format(f):
                    skipped["not a data file"].append(f)
                elif f.is_file():
                    files.append(f)
        files.sort()
    else:
        raise MissingInput(f"data.input={path} does not exist")
    if not files:
        raise Refusal(f"data.input={path} holds no {' / '.join(FORMATS)} files"
                      + (f" (skipped: {dict((k, len(v)) for k, v in skipped.items())})"
                      if skipped else ""))
    duplicates = same_content(files)
    if duplicates and on_duplicate != "skip":
        dup, first = next(iter(duplicates.items()))
        raise Refusal(f"{dup} has the same content as {first}: its documents would be published "
                      "twice, and could land in both train and test; remove one, or set "
                      "data.on_duplicate_file=skip to read the first alone")
    skipped["duplicate content"] += list(duplicates)
    return Found([f for f in files if f not in duplicates], dict(skipped), duplicates)


def same_content(files: list[Path]) -> dict[Path, Path]:
    """{file: an earlier file with the same bytes}: files of equal size hashed (sha256) and
    compared; a file of a size no other has is never read here."""
    by_size = defaultdict(list)
    for f in files:
        by_size[f.stat().st_size].append(f)
    out = {}
    for group in (g for g in by_size.values() if len(g) > 1):
        seen = {}
        for f in group:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
            if h.digest() in seen:
                out[f] = seen[h.digest()]
            else:
                seen[h.digest()] = f
    return out


@dataclasses.dataclass
class Document:
    where: str                          # file:row, for messages
    pieces: Iterator[str] | None = None  # text, in pieces of at most ~CHUNK_CHARS
    messages: list | None = None         # a chat: [{role, content}, ...]
    rendered: object = None              # a chat as `check_chat` rendered it (the tokenizer's)


class BadRow(Refusal):
    """A row that is not a document; `kind` counts it when skipped."""

    def __init__(self, message: str, kind: str = "malformed"):
        super().__init__(message)
        self.kind = kind


class Reader:
    """The documents of `files`, in order, each time it is iterated. `skipped` counts the bad
    rows left out per file (on_bad_row=skip) in the last pass, `kinds` per kind. `check_chat`
    renders a chat as the tokenizer will (its template may refuse it: a bad row too)."""

    def __init__(self, files: list[Path], text_field: str, messages_field: str, min_chars: int,
                 on_bad_row: str, check_chat: Callable[[list], object] | None = None):
        self.files, self.text_field, self.messages_field = files, text_field, messages_field
        self.min_chars, self.on_bad_row, self.check_chat = min_chars, on_bad_row, check_chat
        self.skipped: Counter = Counter()
        self.kinds: Counter = Counter()

    def __iter__(self) -> Iterator[Document]:
        self.skipped, self.kinds = Counter(), Counter()
        for f in self.files:
            try:
                if file_format(f) == ".txt":
                    if _has_chars(f, self.min_chars):
                        yield Document(str(f), pieces=_read_pieces(f))
                    continue
                rows = _parquet_rows(f, self.text_field, self.messages_field) \
                    if file_format(f) == ".parquet" else _json_rows(f)
                for n, row in rows:
                    doc = self._document(f, n, row)
                    if doc is not None:
                        yield doc
            except UnicodeDecodeError as e:  # in its first block (_has_chars)
                raise not_utf8(f, e, 0) from e

    def _document(self, f: Path, n: int, row) -> Document | None:
        try:
            if isinstance(row, BadRow):
                raise row
            if not isinstance(row, dict):
                raise BadRow(f"not a JSON object ({short(row, 40)})", "not JSON")
            if row.get(self.messages_field) is not None and row.get(self.text_field) is None:
                messages = check_messages(row[self.messages_field], self.messages_field)
                if sum(len(m["content"]) for m in messages) < self.min_chars:
                    return None
                for m in messages:
                    lone_surrogate(m["content"])
                return Document(f"{f}:{n}", messages=messages, rendered=self._render(messages))
            if self.text_field not in row:
                raise BadRow(f"no '{self.text_field}' (or '{self.messages_field}') field; set "
                             "data.text_field", "no text field")
            text = row[self.text_field]
            if not isinstance(text, str):
                raise BadRow(f"'{self.text_field}' is {type(text).__name__} "
                             f"{short(text, 40)}, not a string", "not a string")
            lone_surrogate(text)
        except BadRow as e:
            if self.on_bad_row == "skip":
                self.skipped[str(f)] += 1
                self.kinds[e.kind] += 1
                return None
            raise Refusal(f"{f}:{n}: {e}; fix or drop the row, or set data.on_bad_row=skip "
                          "to leave such rows out (counted in the manifest)") from None
        if len(text.strip()) < self.min_chars:
            return None
        return Document(f"{f}:{n}", pieces=split(text))


    def _render(self, messages: list):
        """`check_chat(messages)` (None without one), its refusal a bad row of this chat."""
        if self.check_chat is None:
            return None
        try:
            return self.check_chat(messages)
        except Refusal as e:
            raise BadRow(str(e), "chat template") from None
        except Exception as e:  # the tokenizer's own template: jinja2's TemplateError, a
            # KeyError or TypeError from its code, raise_exception(...) on turns it rejects
            raise BadRow(f"the chat template refuses it ({type(e).__name__}: {e})",
                         "chat template") from None


def lone_surrogate(text: str) -> None:
    """A BadRow for text holding half a UTF-16 surrogate pair (valid JSON, not valid text: it
    cannot be encoded, and tokenizers fail on it)."""
    m = SURROGATE.search(text)
    if m:
        raise BadRow(f"a lone surrogate \\u{ord(m.group()):04x} at character {m.start()} (a "
                     "JSON \\u escape without its pair)", "lone surrogate")


def check_messages(messages, field: str) -> list[dict]:
    """A chat's messages: a non-empty list of {role: str, content: str} with an assistant turn."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise BadRow(f"'{field}' is not a list of {{role, content}} with string values "
                     f"({short(messages, 60)})", "bad messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(f"'{field}' has no assistant turn: nothing to learn from", "bad messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class _Zstd(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame; a file that ends inside a frame (a
    truncated download) raises EOFError instead of ending early, as gzip does."""

    def __init__(self, f: Path):
        import zstandard  # lazy: only for .zst input

        self._zstd, self._fh, self._rest = zstandard, open(f, "rb"), b""
        self._d = self._frame()

    def _frame(self):
        return self._zstd.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._rest:
            chunk = self._fh.read(1 << 20)
            if not chunk:
                if not self._d.eof:
                    raise EOFError("the file ends inside a compressed frame")
                return 0
            while chunk:
                if self._d.eof:  # the next frame
                    self._d = self._frame()
                self._rest += self._d.decompress(chunk)
                chunk = self._d.unused_data
        n = min(len(b), len(self._rest))
        b[:n], self._rest = self._rest[:n], self._rest[n:]
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def _open_lines(f: Path):
    """A JSONL file's lines as bytes (decoded one at a time: a line that is not UTF-8 is a bad
    row, not the end of the file)."""
    fmt = file_format(f)
    if fmt == ".jsonl.gz":
        return gzip.open(f, "rb")
    if fmt == ".jsonl.zst":
        return io.BufferedReader(_Zstd(f))
    return open(f, "rb")


def _json_rows(f: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed object or BadRow) per non-blank line (a UTF-8 byte order mark,
    which Windows editors write, skipped); a corrupt compressed file is refused naming it and
    the line it broke at."""
    n = 0
    try:
        with _open_lines(f) as fh:
            for n, line in enumerate(fh, 1):
                if n == 1:
                    line = line.removeprefix(codecs.BOM_UTF8)
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield n, BadRow(f"not UTF-8 text ({e.reason} at byte {e.start})", "not UTF-8")
                except json.JSONDecodeError as e:
                    yield n, BadRow(f"not a JSON object ({e})", "not JSON")
    except Exception as e:  # EOFError / OSError (gzip), EOFError / ZstdError (zstandard)
        if not isinstance(e, (EOFError, OSError)) and type(e).__name__ != "ZstdError":
            raise
        raise Refusal(f"{f} is damaged after line {n} ({type(e).__name__}: {e}); "
                      "re-download or re-compress it") from e


def _parquet_rows(f: Path, text_field: str, messages_field: str):
    """(row number, {column: value}) per row of the text column, or of the messages column when
    the file has no text column; one record batch in memory at a time."""
    # lazy: pyarrow (a second to import), only for Parquet input
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise Refusal(f"{f} is not a readable Parquet file ({e}); re-download it") from e
    names = pf.schema_arrow.names
    column = text_field if text_field in names else messages_field if messages_field in names \
        else None
    if column is None:
        raise Refusal(f"{f} has no column '{text_field}' (columns: {names[:10]}); set "
                      "data.text_field to the column holding the text")
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=[column]):
            for value in batch.column(0).to_pylist():
                n += 1
                yield n, {column: value} if value is not None else BadRow(
                    f"'{column}' is null", "null")
    except (pa.ArrowException, OSError) as e:
        raise Refusal(f"{f} is damaged at row {n + 1} ({e}); re-download it") from e


def split(text: str) -> Iterator[str]:
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


def not_utf8(f: Path, e: UnicodeDecodeError, after: int) -> Refusal:
    return Refusal(f"{f} is not UTF-8 text ({e.reason}, after character {after:,}): convert "
                      "it (e.g. iconv -f latin1 -t utf-8) or leave it out")


def _read_pieces(f: Path) -> Iterator[str]:
    """A .txt file's text in pieces (`split`), a UTF-8 byte order mark dropped. Read while the
    document is tokenised: a file that stops being UTF-8 past its first block is named here."""
    done = 0
    with open(f, encoding="utf-8-sig") as fh:
        rest = ""
        while True:
            try:
                block = fh.read(CHUNK_CHARS)
            except UnicodeDecodeError as e:
                raise not_utf8(f, e, done) from e
            if not block:
                break
            done += len(block)
            *whole, rest = split(rest + block)
            yield from whole
        yield rest


def _has_chars(f: Path, min_chars: int) -> bool:
    """Whether a .txt file holds at least `min_chars` non-blank characters (read in blocks)."""
    n = 0
    with open(f, encoding="utf-8-sig") as fh:
        while n < min_chars and (block := fh.read(CHUNK_CHARS)):
            n += len(block.strip())
    return n >= min_chars
