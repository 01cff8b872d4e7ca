"""Corpus sources: what the user names on the command line, streamed as :class:`Document` pieces.

A source is one of
  * ``"stdlib"`` (the default): the running Python's standard-library ``.py`` files;
  * a text file (``.txt``, ``.md``, ``.py``, ``.rst``, ... see ``TEXT_SUFFIXES``);
  * a ``.jsonl`` file (one document per line, from its ``text`` field);
  * a ``.parquet`` file (one document per row of its ``text`` column);
  * a directory: its files with a known suffix, recursively, in sorted order (hidden entries,
    i.e. names starting with ``.``, are skipped).
Write ``./stdlib`` to read a directory that happens to be called ``stdlib``.

Train/validation split: a document goes to validation iff the first 8 bytes of
``sha256(key)``, read as a fraction of 2**64, fall below ``val_fraction``. Keys are stable:
the relative POSIX path for stdlib files, the normalized path as given for text files,
``path:line`` (1-based) for jsonl rows and ``path:row`` (0-based) for parquet rows. All chunks
of one text file share its key, hence its split.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sysconfig
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from puzzle.data import readers
from puzzle.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "all")
STDLIB = "stdlib"
# Left out of the stdlib corpus: third-party code, caches, and build-specific files whose
# presence or content depends on the machine (``_sysconfigdata_*``, ``config-3.X-<platform>/``).
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Document:
    """A document, or one piece of a long one."""

    key: str
    """Stable id of the document (all pieces of one document share it); decides its split."""
    text: str
    """The text of this piece."""
    ends: bool = True
    """True when this piece ends its document (an EOS token follows it when packing)."""


@dataclass(frozen=True)
class CorpusStats:
    """What :func:`corpus_stats` counts."""

    documents: int
    """Documents (pieces with ``ends=True``)."""
    pieces: int
    """Pieces (a long text file is read as several)."""
    characters: int
    """Unicode characters of text."""
    bytes: int
    """UTF-8 bytes of text."""


def split_of(key: str, val_fraction: float) -> str:
    """``"validation"`` or ``"train"`` for a document key; stable across runs and machines."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def stdlib_root() -> Path:
    """The running Python's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _keep_stdlib(rel: str) -> bool:
    """``walk_sorted`` filter; ``rel`` ends with "/" for a directory."""
    parts = rel.rstrip("/").split("/")
    name = parts[-1]
    if rel.endswith("/"):
        top_level_config = len(parts) == 1 and name.startswith("config-")
        return name not in _STDLIB_EXCLUDED_DIRS and not top_level_config
    return name.endswith(".py") and not name.startswith("_sysconfigdata_")


def stdlib_files() -> Iterator[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of every stdlib ``.py`` file, sorted by relative path, lazily."""
    root = stdlib_root()
    for path in readers.walk_sorted(root, keep=_keep_stdlib):
        yield path.relative_to(root).as_posix(), path


def _keep_user(rel: str) -> bool:
    name = rel.rstrip("/").rsplit("/", 1)[-1]
    if name.startswith("."):
        return False
    return rel.endswith("/") or PurePath(name).suffix.lower() in readers.KNOWN_SUFFIXES


def _in_split(key: str, split: str, val_fraction: float) -> bool:
    return split == "all" or split_of(key, val_fraction) == split


def _file_pieces(path: Path, key: str, *, split: str, val_fraction: float,
                 chunk_bytes: int) -> Iterator[readers.Piece]:
    """Pieces of one user file in ``split``; a text file outside it is not even opened."""
    suffix = path.suffix.lower()
    if suffix in readers.JSONL_SUFFIXES:
        yield from (p for p in _jsonl(path, key) if _in_split(p[0], split, val_fraction))
    elif suffix in readers.PARQUET_SUFFIXES:
        yield from (p for p in readers.read_parquet(path, key) if _in_split(p[0], split, val_fraction))
    elif _in_split(key, split, val_fraction):  # a text file (suffixes were checked already)
        yield from readers.read_text(path, key, chunk_bytes=chunk_bytes)


def _jsonl(path: Path, key: str) -> Iterator[readers.Piece]:
    """:func:`readers.read_jsonl`, with bytes that are no UTF-8 text (a binary file) a :class:`DataError`."""
    try:
        yield from readers.read_jsonl(path, key)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x}; a binary file?); a .jsonl file "
                        "holds one JSON object per line, in UTF-8") from None


def source_names(sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] | None) -> list[str]:
    """Sources as a list of strings: ``None`` or empty means ``["stdlib"]``; one path is a list of one."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    return [os.fspath(s) for s in sources] if sources else [STDLIB]


def check_sources(sources: Sequence[str | os.PathLike[str]] | str | None) -> None:
    """Open every source and read its first document (:class:`DataError` naming the source or file).

    Refuses a missing path, a file of unknown type, a source that holds no document (an empty file, a
    directory without a file of a known type) and one whose first document does not read (a ``.jsonl``
    line that is not JSON, has no ``text`` or is not UTF-8; a Parquet file without a ``text`` column). A
    search calls it before it writes anything; what lies past the first document is read when a stage
    streams it."""
    for name in source_names(sources):
        _check_source(name)
        with contextlib.closing(_source_pieces(name, split="all", val_fraction=0.0,
                                               chunk_bytes=readers.CHUNK_BYTES)) as pieces:
            if next(pieces, None) is None:
                raise DataError(f"data source {name!r} holds no document (an empty file, or a directory without "
                                f"a text, .jsonl or .parquet file); add data")


def _check_source(source: str) -> None:
    """Fail early (before any reading) on a missing path or a file of unknown type."""
    if source == STDLIB:
        return
    path = Path(source).expanduser()
    if path.is_dir():
        return
    if not path.is_file():
        raise DataError(f"data source {source!r} does not exist; pass an existing file or directory, "
                        f"or {STDLIB!r} for the Python standard library")
    suffix = path.suffix.lower()
    if suffix not in readers.KNOWN_SUFFIXES:
        known = " ".join(sorted(readers.KNOWN_SUFFIXES))
        raise DataError(f"{source}: unknown file type {suffix or '(no suffix)'!r}; "
                        f"use one of {known}, or a directory holding such files")


def _source_pieces(source: str, *, split: str, val_fraction: float,
                   chunk_bytes: int) -> Iterator[readers.Piece]:
    """The pieces of one (checked) source that fall in ``split``."""
    if source == STDLIB:
        for rel, path in stdlib_files():
            if _in_split(rel, split, val_fraction):
                # A few files under test/ are deliberately not UTF-8: expected, so not a warning.
                yield from readers.read_text(path, rel, chunk_bytes=chunk_bytes, bad_utf8_level=logging.DEBUG)
        return
    path = Path(source).expanduser()
    files = readers.walk_sorted(path, keep=_keep_user) if path.is_dir() else [path]
    for file in files:
        key = PurePath(os.path.normpath(file)).as_posix()
        yield from _file_pieces(file, key, split=split, val_fraction=val_fraction, chunk_bytes=chunk_bytes)


def _stream(names: list[str], *, split: str, val_fraction: float,
            chunk_bytes: int) -> Generator[Document, None, None]:
    for name in names:
        kept = 0
        for key, text, ends in _source_pieces(name, split=split, val_fraction=val_fraction, chunk_bytes=chunk_bytes):
            kept += 1
            yield Document(key=key, text=text, ends=ends)
        if kept == 0:
            raise DataError(f"data source {name!r} has no documents in the {split!r} split "
                            f"(val_fraction={val_fraction}); add data, or change split / val_fraction")


def iter_documents(sources: Sequence[str | os.PathLike[str]] | str | None = None, *, split: str = "train",
                   val_fraction: float = 0.05,
                   chunk_bytes: int = readers.CHUNK_BYTES) -> Generator[Document, None, None]:
    """Stream the documents of ``sources`` (default ``["stdlib"]``) that fall in ``split``, lazily.

    Sources are read one after the other, files within a directory in sorted order, so the
    stream is identical on every run. Arguments and paths are checked now; a malformed
    jsonl/parquet file, or a source with nothing in ``split``, raises :class:`DataError` when
    the stream reaches it.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"val_fraction must be in [0, 1], got {val_fraction!r}")
    if chunk_bytes < 1:
        raise DataError(f"chunk_bytes must be positive, got {chunk_bytes!r}")
    names = source_names(sources)
    for name in names:
        _check_source(name)
    return _stream(names, split=split, val_fraction=val_fraction, chunk_bytes=chunk_bytes)


def corpus_stats(sources: Sequence[str | os.PathLike[str]] | str | None = None, *, split: str = "all",
                 val_fraction: float = 0.05) -> CorpusStats:
    """Count documents, pieces, characters and UTF-8 bytes of a corpus (reads it all, streaming)."""
    documents = pieces = characters = size = 0
    for doc in iter_documents(sources, split=split, val_fraction=val_fraction):
        pieces += 1
        documents += doc.ends
        characters += len(doc.text)
        size += len(doc.text.encode("utf-8"))
    return CorpusStats(documents=documents, pieces=pieces, characters=characters, bytes=size)
