"""The sha256 of a model's files by their bytes, computed once per file state and cached.

A parent's fingerprint must change when its tensors do, even when a re-trained parent is saved with
the same names and sizes into the same directory. Only the bytes can tell, and reading a few GB on
every run would be slow, so each file's sha256 is cached under ``cache_root()/hashes/`` (one small
JSON file per path, named by the hash of the resolved path; never next to the model: puzzle never
writes into a directory whose weights it reads). An entry is used only while the file's stat
identity is the one it recorded:

* size and ``mtime_ns``: any ordinary rewrite changes them;
* ``ctime_ns`` and the inode: a rewrite whose mtime was set back (``os.utime``), or a file replaced
  by another of the same size and mtime, still changes these, which only the kernel sets.

A file changed in the last :data:`FRESH_NS` is hashed but not cached: the kernel stamps times at a
coarse tick, so a second write within the same tick could leave every stat field as it was (git's
"racy" entries). ``verify=True`` ignores the cache and reads the bytes again (``puzzle search
--verify``), once per process for each file state, and stores the fresh hash for later lookups. A
cache that cannot be written (read-only, full) costs a re-hash next time, never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 8 << 20
"""Bytes read per step (SmolLM2's 540 MB hash in about 1.7 s on a busy 2-core machine)."""
ANNOUNCE_BYTES = 256 << 20
"""Files at least this large are announced (once, when actually hashed): reading them takes a moment."""
FRESH_NS = 2_000_000_000
"""A file whose mtime or ctime is this recent (ns) is not cached (module docstring)."""
MAX_ENTRIES = 2000
"""When the cache holds more entries, those of files that no longer exist are dropped."""

_VERIFIED: dict[tuple[Any, ...], str] = {}
"""Hashes read from the bytes by this process under ``verify`` (a second ``--verify`` lookup of the
same, unchanged file, e.g. by the plan and then the search, reads it once)."""
_WARNED: list[bool] = []


def cache_dir() -> Path:
    """Where the hashes are cached: ``cache_root()/hashes`` (``$PUZZLE_CACHE_DIR`` moves it)."""
    from puzzle.parents.embedded import cache_root

    return cache_root() / "hashes"


def content_sha256(path: str | Path, *, verify: bool = False) -> str:
    """The sha256 of ``path``'s bytes: from the cache while the file's stat identity is unchanged
    (module docstring), else read in chunks and cached. ``verify``: read the bytes regardless."""
    path = Path(path).resolve()
    st = path.stat()
    ident = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
             "ino": st.st_ino, "dev": st.st_dev}
    memo_key = tuple(ident.values())
    entry = _entry_path(path)
    if verify:
        if memo_key in _VERIFIED:
            return _VERIFIED[memo_key]
    elif (cached := _read_entry(entry, ident)) is not None:
        return cached
    sha = _hash_file(path, st.st_size)
    after = path.stat()
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
        return sha  # written while being read: neither this hash nor the old identity can be trusted later
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < FRESH_NS:
        with contextlib.suppress(OSError):  # may still change within the same tick; an older entry is no better
            entry.unlink(missing_ok=True)
        return sha
    if verify:
        _VERIFIED[memo_key] = sha
    _write_entry(entry, {**ident, "sha256": sha})
    return sha


def _entry_path(path: Path) -> Path:
    return cache_dir() / f"{hashlib.sha256(str(path).encode()).hexdigest()[:40]}.json"


def _read_entry(entry: Path, ident: dict[str, Any]) -> str | None:
    """The cached hash when ``entry`` records exactly this file state; anything else (absent, garbled,
    another state) is a miss."""
    try:
        data = json.loads(entry.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in ident.items()):
        return None
    sha = data.get("sha256")
    return sha if isinstance(sha, str) and len(sha) == 64 else None


def _hash_file(path: Path, size: int) -> str:
    if size >= ANNOUNCE_BYTES:
        log.info("hashing %s (%.0f MB) to fingerprint its weights; cached until the file changes",
                 path, size / 1e6)
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _write_entry(entry: Path, data: dict[str, Any]) -> None:
    from puzzle.io import atomic_write_json

    try:
        atomic_write_json(entry, data)
        if sum(1 for _ in entry.parent.glob("*.json")) > MAX_ENTRIES:
            _prune(entry.parent)
    except OSError as e:
        if not _WARNED:
            _WARNED.append(True)
            log.warning("cannot cache file hashes in %s (%s); weights are hashed again on every run",
                        entry.parent, e.strerror or e)


def _prune(directory: Path) -> None:
    """Drop the entries of files that no longer exist (temporary models of tests and experiments)."""
    for entry in directory.glob("*.json"):
        try:
            if not Path(json.loads(entry.read_text())["path"]).exists():
                entry.unlink(missing_ok=True)
        except (OSError, ValueError, KeyError, TypeError):
            entry.unlink(missing_ok=True)
