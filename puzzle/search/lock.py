"""One writer per run directory: an advisory lock on ``OUT/.lock``, held by a search for its whole run.

    with hold(run_dir):          # RunInUseError at once if another search holds it
        prepare(...); run the stages

Two searches writing one directory corrupt each other's stages (one replaces the library while the
other records its files), so the second is refused before it writes anything. The lock is
``fcntl.flock(LOCK_EX | LOCK_NB)`` on the file ``.lock``: the kernel releases it when the holder
exits, crashed or killed, so a lock is never stale and nothing has to clean it up. The file stays
(deleting a lock file races with a process that just opened it); a hidden name, it is never recorded
by a stage, and the run-directory checks accept it. The holder writes its pid, host and start time
into it, which the refusal quotes. Under ``torchrun`` rank 0 holds it for the whole group.

``OUT/.lock`` can only be taken once every check passed (nothing is written before), which is seconds
of imports and reading after a command starts. So that two searches started together are told at
once rather than after those seconds, ``puzzle search`` first *claims* the directory (:func:`claim`):
a lock named after its resolved path in this user's runtime directory (:func:`claims_dir`; nothing is
written into ``OUT``), held for the command. A claim only speeds the refusal up among one user's
searches on one machine; ``OUT/.lock`` is what excludes, for every user and host that sees ``OUT``.

:func:`check_free` is the test without holding anything and without creating a file, for preflight
(which writes nothing). Takes and tests that meet retry for :data:`RETRY_S` rather than refusing
each other.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from puzzle.errors import ConfigError, RunInUseError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
"""The lock's name in a run directory (hidden: never recorded, never a reason to refuse a directory)."""
RETRY_S = 1.0
"""How long a take or a test retries before it refuses (another process's test holds the lock for
microseconds; a search holds it for its run)."""


def check_free(run_dir: str | Path, *, flag: str = "--out") -> None:
    """Raise :class:`RunInUseError` if a search holds ``run_dir`` now. Creates and writes nothing.
    ``flag``: how the refusal names the directory (``--out``, ``shared_dir``)."""
    if not str(run_dir).strip():
        return  # no directory named (preflight refuses that)
    path = Path(run_dir).expanduser() / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file (or no directory): nobody has ever held it
    try:
        if _acquire(fd, fcntl.LOCK_SH) is False:  # shared: it conflicts with a holder only, and works read-only
            raise RunInUseError(_refusal(path, flag, run_dir))
    finally:
        os.close(fd)  # and with it the shared lock


@contextlib.contextmanager
def hold(run_dir: str | Path, *, flag: str = "--out", display: str | Path | None = None) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the ``with`` block (creating the directory if needed), or raise
    :class:`RunInUseError` naming the holder. ``flag``, ``display``: how the refusal names the directory
    (``display``: as the user typed it; default ``run_dir``)."""
    directory = Path(run_dir).expanduser()
    path = directory / LOCK_FILE
    shown = run_dir if display is None else display
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # never O_TRUNC: the holder's record stays readable
    except OSError as e:
        raise ConfigError(f"{flag} {shown}: cannot create {path} ({e.strerror or e}); choose a writable "
                          f"{flag}") from None
    try:
        _take(fd, path, flag, shown)
        yield path
    finally:
        os.close(fd)  # releases the lock (the kernel does the same when the process dies)


@contextlib.contextmanager
def claim(run_dir: str | Path, *, flag: str = "--out") -> Iterator[None]:
    """For the ``with`` block (a whole ``puzzle search``): refuse at once a ``run_dir`` that another
    search holds or has claimed, and claim it (module docstring). Writes nothing into ``run_dir``.
    Under ``torchrun`` only rank 0 claims (the other ranks are the same search)."""
    opened = _open_claim(run_dir) if os.environ.get("RANK", "0") == "0" else None
    if opened is None:  # no directory named, another rank, or no safe claims directory: OUT/.lock decides
        check_free(run_dir, flag=flag)
        yield
        return
    fd, path = opened
    try:
        _take(fd, path, flag, run_dir)
        check_free(run_dir, flag=flag)  # a holder that started before the claims did
        yield
    finally:
        os.close(fd)


def claims_dir() -> Path:
    """Where claims live: ``$XDG_RUNTIME_DIR/puzzle-claims``, else ``<tmp>/puzzle-<uid>/claims`` (runtime
    state, gone at reboot; never in a run directory nor in the cache puzzle refuses to write runs into)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "puzzle-claims"
    return Path(tempfile.gettempdir()) / f"puzzle-{os.getuid()}" / "claims"


def _open_claim(run_dir: str | Path) -> tuple[int, Path] | None:
    """The open claim file of ``run_dir`` (named by the hash of its resolved path), or None where none can
    be made safely (a directory of another user's, a link)."""
    if not str(run_dir).strip():
        return None
    resolved = str(Path(run_dir).expanduser().resolve())
    directory = claims_dir()
    path = directory / f"{hashlib.sha256(resolved.encode()).hexdigest()[:40]}.lock"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (directory, directory.parent):  # in a shared /tmp, only directories of ours, no links
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                return None
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600), path
    except OSError:
        return None


def _take(fd: int, path: Path, flag: str, shown: str | Path) -> None:
    """Lock ``fd`` (the open lock file ``path``) exclusively and record this process as its holder."""
    got = _acquire(fd, fcntl.LOCK_EX)
    if got is False:
        raise RunInUseError(_refusal(path, flag, shown))
    if got is None:
        log.warning("%s %s: this filesystem does not lock files; make sure no other search writes there", flag, shown)
    _write_holder(fd)


def _acquire(fd: int, mode: int) -> bool | None:
    """True once locked, False when another process holds it for :data:`RETRY_S`, None when the
    filesystem cannot lock (``ENOLCK``, ``EOPNOTSUPP``: some network filesystems)."""
    deadline = time.monotonic() + RETRY_S
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        except OSError:
            return None


def _write_holder(fd: int) -> None:
    """The holder's record, for the refusal of the next search (informative only: a full disk that
    keeps it from being written leaves the lock held and the refusal saying "pid unknown")."""
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


def holder(path: Path) -> dict[str, Any]:
    """What the lock file at ``path`` says about its holder (``{}`` when unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _refusal(path: Path, flag: str, run_dir: str | Path) -> str:
    info: dict[str, Any] = {}
    for _ in range(20):  # the holder writes its record right after taking the lock
        if (info := holder(path)).get("pid"):
            break
        time.sleep(0.05)
    pid = info.get("pid", "unknown")
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    since = f", started {info['started']}" if info.get("started") else ""
    return (f"{flag} {run_dir} is in use by another search (pid {pid}{where}{since}); wait for it or choose "
            f"another {flag}")


@contextlib.contextmanager
def one_writer(group: Any, run_dir: Path, shared: Path, *, typed: str | Path) -> Iterator[None]:
    """Rank 0 holds the run directory's lock, and the shared directory's, for the ``with`` block (the
    other ranks are the same search); every rank learns whether it got them, so a refusal stops all."""
    with contextlib.ExitStack() as held:
        refusal = None
        if group.first:
            try:
                held.enter_context(hold(run_dir, display=typed))
                if shared != run_dir:
                    held.enter_context(hold(shared, flag="shared_dir"))
            except Exception as e:  # noqa: BLE001 - any failure here must reach the waiting ranks too
                refusal = e
        refusal = group.broadcast(refusal)
        if refusal is not None:
            raise refusal
        yield
