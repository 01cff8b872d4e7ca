"""Atomic text writes: a temporary sibling, renamed into place, so that readers see the old file or the new one.

Standard library only: :mod:`puzzle.io` writes every artifact of the toolkit with this same function.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask. Read from ``/proc`` where the OS has it: setting the umask to read it (the only portable
    way) races with threads that create files meanwhile."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary sibling and ``os.replace`` (fsynced first).

    The file gets the mode that ``open(path, "w")`` gives a new file (0666 less the umask), not the 0600 that the
    temporary file is created with.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            e.filename = str(path)  # a full disk met by write or fsync names no file: say which
        raise
