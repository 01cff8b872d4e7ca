"""The file system's refusals as one line each: what failed, on which path, and what to do.

    no space left on device writing runs/x/child_bld/child/model.safetensors: free space and rerun;
    the run resumes from its finished stages

Any command can meet a full disk, a read-only volume or a file where a directory should be, and
the place that meets it (a tensor write deep inside a stage) knows neither the run nor what the user
can do. So nothing converts these where they happen: the CLI hands every uncaught ``OSError`` to
:func:`storage_error`, which reads its ``errno`` and path (the final path, not the ``.name.XXXXXXXX.tmp``
sibling the atomic writers use) and returns a :class:`~puzzle.errors.StorageError` with the fix.
safetensors reports a failed write as ``SafetensorError("... (os error 28)")``; that is read too.
Every write is atomic (:mod:`puzzle.io`), so the fixed rerun finds whole artifacts or none and resumes.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from puzzle.errors import StorageError

_WRITING = "{cause} writing {path}"
_AT = "{cause}: {path}"

# errno -> (how the line starts, what to do). {path} is the failing path, {out} "--out" or its directory.
_MESSAGES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: (_WRITING, "free space and rerun"),
    errno.EDQUOT: (_WRITING, "free space or raise the quota, and rerun"),
    errno.EFBIG: (_WRITING, "the file system limits the size of a file: choose another {out} and rerun"),
    errno.EROFS: (_WRITING, "make it writable or choose another {out}, and rerun"),
    errno.EACCES: (_AT, "make it accessible to this user or choose another {out}, and rerun"),
    errno.EPERM: (_AT, "make it accessible to this user or choose another {out}, and rerun"),
    errno.EISDIR: (_AT, "a directory stands where a file is written: move it away or choose another {out}"),
    errno.ENOENT: (_AT, "was it removed while puzzle ran? rerun"),
    errno.ENAMETOOLONG: (_AT, "choose a shorter path"),
    errno.EMFILE: (_AT, "raise the limit of open files (ulimit -n) and rerun"),
    errno.ENFILE: (_AT, "close other programs' files or raise the system's limit, and rerun"),
    errno.EIO: (_AT, "the disk or its file system failed: check it (dmesg), then rerun"),
}

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
"""A temporary sibling of :func:`tempfile.mkstemp` / ``mkdtemp`` as the atomic writers name it."""

_SAFETENSORS_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def storage_error(e: BaseException, *, out: str | Path | None = None, resumes: bool = False) -> StorageError | None:
    """The one-line :class:`StorageError` that ``e`` amounts to, or None when ``e`` is no file-system failure.

    ``out``: the command's ``--out`` (the path named when the error carries none, and the thing to change);
    ``resumes``: the command resumes a run (``puzzle search``), which the message then promises.
    """
    found = os_error_of(e)
    if found is None:
        return None
    if found.errno is None:  # raised by this toolkit with a message of its own, e.g. FileExistsError("... not empty")
        return StorageError(str(found))
    code = found.errno
    if code == errno.EPIPE:  # `puzzle inspect ... | head`: nothing went wrong with the files
        return StorageError("broken pipe: the program reading puzzle's output closed it")
    path = shown_path(found.filename) if found.filename is not None else None
    what = "--out" if out is not None and (path is None or _inside(path, Path(out))) else "place"
    shown = str(path) if path is not None else (f"under {out}" if out is not None else "a file")
    cause = os.strerror(code)
    cause = cause[0].lower() + cause[1:]
    if code in (errno.ENOTDIR, errno.EEXIST) and path is not None and (blocker := _file_in_the_way(path)) is not None:
        made = f"--out {out}" if out is not None and _inside(Path(out), blocker) else str(path)
        head = f"not a directory: {blocker} is a file, so {made} cannot be made"
        fix = f"move {blocker.name} away or choose another {'--out' if made != str(path) else what}"
    elif code in _MESSAGES:
        start, fix = _MESSAGES[code]
        head, fix = start.format(cause=cause, path=shown), fix.format(out=what)
    else:
        head, fix = f"{cause}: {shown}", "fix that and rerun"
    if resumes:  # another --out starts afresh: only the same one resumes
        fix += "; with the same --out the run resumes" if "another" in fix else "; the run resumes"
        fix += " from its finished stages"
    return StorageError(f"{head}: {fix}")


def os_error_of(e: BaseException) -> OSError | None:
    """``e`` or its explicit cause as an ``OSError``: itself, or a safetensors error that wraps one."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        if type(current).__name__ == "SafetensorError":  # no import: safetensors may be absent here
            match = _SAFETENSORS_OS_ERROR.search(str(current))
            if match:
                return OSError(int(match.group(1)), os.strerror(int(match.group(1))))
        current = current.__cause__
    return None


def shown_path(filename: str | bytes | int | os.PathLike) -> Path:
    """The path a user knows: each ``.name.XXXXXXXX.tmp`` component of an atomic write shown as ``name``."""
    if isinstance(filename, int):  # an fd: nothing better to name
        return Path(f"<file descriptor {filename}>")
    path = Path(os.fsdecode(filename))
    return Path(*(m.group("name") if (m := _TEMPORARY.match(part)) else part for part in path.parts))


def _file_in_the_way(path: Path) -> Path | None:
    """The first component of ``path`` (from the root down) that exists and is not a directory."""
    for candidate in (*reversed(path.parents), path):
        if candidate.exists() and not candidate.is_dir():
            return candidate
        if not candidate.exists():
            return None
    return None


def _inside(path: Path, out: Path) -> bool:
    try:
        path, out = path.resolve(), out.expanduser().resolve()
    except OSError:
        return False
    return path == out or out in path.parents
