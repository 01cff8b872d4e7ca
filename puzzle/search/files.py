"""The files of a run directory: which ones a stage records (glob patterns), their hashes, and the
hidden temporaries that interrupted writes leave behind.

Patterns are relative to the run directory: ``*`` and ``?`` within one name, ``**`` for any number
of directories, ``[...]`` as in fnmatch, a pattern naming a directory means everything under it, and
a leading ``!`` excludes. Hidden names (``.``-prefixed: temporaries) and the stages' own
``<stage>/stage.json`` manifests are never recorded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "stage.json"
CHUNK = 1 << 20
TEMPORARIES = (".*.tmp",)
"""Names of temporaries (files or directories) of interrupted writes; see :func:`clean_temporaries`."""
TEMPORARY_DIRS = (".*.building",)
"""Names of directories under construction (``build_library``'s ``.lib.building``)."""


def absolute(root: Path | str) -> Path:
    """``root`` made absolute without resolving symlinks (the run directory as the user named it)."""
    return Path(os.path.abspath(root))


def record_files(root: Path, patterns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of the files under ``root`` that ``patterns`` name."""
    return {rel: {"size": (root / rel).stat().st_size, "sha256": file_sha256(root / rel)}
            for rel in matching_files(root, patterns)}


def matching_files(root: Path, patterns: Sequence[str]) -> list[str]:
    """The sorted relative paths of the files under ``root`` that ``patterns`` name (module docstring)."""
    root = absolute(root)
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [_regex(p[1:].strip("/")) for p in patterns if p.startswith("!")]
    found: set[str] = set()
    for pattern in include:
        pattern = pattern.strip("/")
        if not _has_magic(pattern) and (root / pattern).is_dir():
            pattern += "/**"  # a directory stands for everything under it
        regex = _regex(pattern)
        base = root / pattern if not _has_magic(pattern) else root.joinpath(*_take_literal(pattern.split("/")))
        for rel in _walk(root, base):
            if regex.fullmatch(rel):
                found.add(rel)
    stage_manifest = re.compile(r"[^/]+/" + re.escape(MANIFEST))
    return sorted(rel for rel in found if not stage_manifest.fullmatch(rel)
                  and not any(x.fullmatch(rel) for x in exclude)
                  and not any(part.startswith(".") for part in rel.split("/")))


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _take_literal(parts: list[str]) -> list[str]:
    """The leading directories of a pattern that have no wildcard (where the walk can start)."""
    literal = []
    for part in parts[:-1]:
        if _has_magic(part):
            break
        literal.append(part)
    return literal


def _walk(root: Path, base: Path) -> list[str]:
    """Relative posix paths of the non-hidden files under ``base`` (``base`` itself if a file)."""
    if base.is_file():
        return [] if base.name.startswith(".") else [base.relative_to(root).as_posix()]
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        out += [(rel_dir / f).as_posix() for f in filenames if not f.startswith(".") and Path(dirpath, f).is_file()]
    return out


def _regex(pattern: str) -> re.Pattern[str]:
    """A glob with ``**`` (any number of directories) as a regex over posix relative paths."""
    parts = pattern.split("/")
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".+" if last else "(?:[^/]+/)*")
            continue
        out.append(_segment_regex(part) + ("" if last else "/"))
    return re.compile("".join(out))


def _segment_regex(part: str) -> str:
    """One path segment of a glob: ``*`` and ``?`` never cross a ``/``; ``[...]`` as in fnmatch."""
    out, i = [], 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (j := part.find("]", i + 2 if part[i + 1:i + 2] in ("!", "]") else i + 1)) != -1:
            body = part[i + 1:j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (weights can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- temporaries


def clean_temporaries(root: Path, *, min_age_s: float = 0.0) -> list[tuple[Path, int]]:
    """Remove the leftovers of interrupted writes under ``root``: ``.*.tmp`` files and directories
    (``atomic_write_*``, ``atomic_directory``) and ``.*.building`` directories (``build_library``).
    Nothing else is touched, and other hidden directories are not entered. ``min_age_s``: keep
    anything modified more recently (another run sharing ``root`` may be writing it now).
    Returns ``(path, bytes)`` of what was removed."""
    root = absolute(root)
    removed: list[tuple[Path, int]] = []
    now = time.time()
    for dirpath, dirnames, filenames in os.walk(root):
        for d in list(dirnames):
            path = Path(dirpath, d)
            if not d.startswith("."):
                continue
            dirnames.remove(d)  # never enter a hidden directory: it is a temporary or not ours
            if _is_temporary(d, directory=True) and not path.is_symlink() and _old(path, now, min_age_s):
                size = _tree_size(path)
                shutil.rmtree(path)
                removed.append((path, size))
        for f in filenames:
            path = Path(dirpath, f)
            if _is_temporary(f, directory=False) and _old(path, now, min_age_s):
                size = path.lstat().st_size
                path.unlink()
                removed.append((path, size))
    for path, size in removed:
        log.info("removed the temporary %s (%d bytes) of an interrupted write", path, size)
    return removed


def _is_temporary(name: str, *, directory: bool) -> bool:
    patterns = TEMPORARIES + (TEMPORARY_DIRS if directory else ())
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _old(path: Path, now: float, min_age_s: float) -> bool:
    """Nothing in ``path`` (a file, or a directory and all under it) was modified in the last ``min_age_s``."""
    if min_age_s <= 0:
        return True
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, _, filenames in os.walk(path):
            newest = max([newest, os.lstat(dirpath).st_mtime] + [os.lstat(os.path.join(dirpath, f)).st_mtime
                                                                  for f in filenames])
    return now - newest >= min_age_s


def _tree_size(path: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(path) for f in fs)
