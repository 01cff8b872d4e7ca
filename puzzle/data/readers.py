"""File-format readers: each streams ``(key, text, ends)`` triples from one file, in file order.

* text files are read in bounded byte chunks cut after a newline, so a multi-GB file never sits
  in memory whole; every chunk carries the file's key and only the last one ``ends`` the document;
* ``.jsonl`` files give one document per non-blank line, from its ``text`` field;
* ``.parquet`` files give one document per row of their ``text`` column, read batch by batch.

``walk_sorted`` lists a directory tree lazily in sorted relative-POSIX-path order.
Nothing here decides the train/validation split: see :mod:`puzzle.data.sources`.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from puzzle.errors import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp",
    ".rs", ".go", ".java", ".js", ".ts", ".sh", ".tex", ".html", ".css", ".toml", ".yaml", ".yml",
})
JSONL_SUFFIXES = frozenset({".jsonl"})
PARQUET_SUFFIXES = frozenset({".parquet"})
KNOWN_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES

CHUNK_BYTES = 1 << 20
"""Text files are read this many bytes at a time (then cut back to the last newline)."""
PARQUET_BATCH_ROWS = 1024

Piece = tuple[str, str, bool]
"""``(key, text, ends)``: one document, or one chunk of a long text file."""


def walk_sorted(root: Path, *, keep: Callable[[str], bool]) -> Iterator[Path]:
    """Files under ``root`` whose relative POSIX path passes ``keep``, sorted by that path, lazily.

    Sorting each directory by ``name + "/"`` for sub-directories and ``name`` for files visits
    paths in exactly ``sorted(relative_posix_paths)`` order while listing one directory at a
    time. Symlinked sub-directories are not followed (no cycles); hidden entries are kept, the
    caller's ``keep`` decides.
    """

    def visit(directory: Path, prefix: str) -> Iterator[Path]:
        with os.scandir(directory) as it:
            entries = [(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in it]
        for sort_name, entry in sorted(entries, key=lambda pair: pair[0]):
            rel = prefix + entry.name
            if sort_name.endswith("/"):
                if keep(rel + "/"):
                    yield from visit(Path(entry.path), rel + "/")
            elif entry.is_file() and keep(rel):
                yield Path(entry.path)

    yield from visit(root, "")


class _Utf8Stream:
    """Incremental UTF-8 decoding that switches to U+FFFD replacement (with one warning) on bad bytes."""

    def __init__(self, path: Path, *, level: int) -> None:
        self.path = path
        self.level = level
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")

    def decode(self, data: bytes, *, final: bool = False) -> str:
        try:
            return self.decoder.decode(data, final=final)
        except UnicodeDecodeError:
            # A failed call leaves the decoder's buffered bytes as they were: replay them.
            buffered = self.decoder.getstate()[0]
            log.log(self.level, "%s is not valid UTF-8; undecodable bytes are replaced with U+FFFD", self.path)
            self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            return self.decoder.decode(buffered + data, final=final)


def read_text(path: Path, key: str, *, chunk_bytes: int = CHUNK_BYTES,
              bad_utf8_level: int = logging.WARNING) -> Iterator[Piece]:
    """One text file as pieces cut after a newline, read ``chunk_bytes`` at a time.

    A piece holds at most ``3 * chunk_bytes`` characters (usually about ``chunk_bytes``); a line
    that long is cut where a block ends. An empty file gives no piece. Invalid UTF-8 is replaced
    by U+FFFD and logged once at ``bad_utf8_level``.
    """
    stream = _Utf8Stream(path, level=bad_utf8_level)
    pending: str | None = None  # held back one step, so the last piece can be marked ``ends``
    carry = ""
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            text = carry + stream.decode(block)
            cut = text.rfind("\n") + 1
            if not cut and len(text) >= chunk_bytes:  # a very long line: cut it anywhere
                cut = len(text)
            text, carry = text[:cut], text[cut:]
            if not text:
                continue
            if pending is not None:
                yield key, pending, False
            pending = text
        carry += stream.decode(b"", final=True)
    if carry:  # text after the last newline joins the last piece
        pending = (pending or "") + carry
    if pending is not None:
        yield key, pending, True


def read_jsonl(path: Path, key: str) -> Iterator[Piece]:
    """One document per non-blank line, keyed ``key:line`` (1-based); empty texts are skipped."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict) or "text" not in row:
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{where}: no 'text' field (found {found}); each line needs a string 'text' field")
            text = row["text"]
            if not isinstance(text, str):
                raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
            if text:
                yield f"{key}:{number}", text, True


def read_parquet(path: Path, key: str, *, batch_rows: int = PARQUET_BATCH_ROWS) -> Iterator[Piece]:
    """One document per row of the ``text`` column, keyed ``key:row`` (0-based); nulls and "" skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as Parquet ({e})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise DataError(f"{path}: no 'text' column; available columns are {names}. Rename the column holding the text")
    field = pf.schema_arrow.field("text")
    if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        raise DataError(f"{path}: column 'text' has type {field.type}; it must hold strings")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text:
                yield f"{key}:{row}", text, True
            row += 1
