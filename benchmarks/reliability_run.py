"""Running a reliability case and judging what it did (the cases: ``benchmarks/reliability_cases.py``).

:func:`run_case` makes a case in an empty directory, runs its command in a subprocess of its own session
(stopped, with everything it started, at the timeout) and snapshots the directory before and after: every
file's size and mtime, so a rewrite counts as a write, while a directory's own mtime does not, so a write
probe that cleans up is no write. :attr:`Outcome.verdict` names the worst failure. Both
``tests/reliability/`` and ``benchmarks/reliability.py`` run the cases through :func:`run_cases`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.reliability_cases import ROOT, Case, Unavailable

TIMEOUT_S = 120.0
"""Seconds a case may run: a refusal in preflight takes 10-25 s on 2 busy cores (nearly all of it importing
torch and transformers); a command that instead runs the tiny search ends in about 35 s, or is stopped here."""


@dataclass
class Outcome:
    """What one run of a case did."""

    case: Case
    exit: int | None
    """The exit status; None when it was stopped at the timeout."""
    stdout: str = ""
    stderr: str = ""
    written: list[str] = field(default_factory=list)
    """Paths under the case's directory created, changed or removed."""
    seconds: float = 0.0
    skipped: str = ""
    """Why the case could not be made here (then nothing ran)."""
    paths: dict[str, str] = field(default_factory=dict)
    """Temporary paths and the names that stand for them in :meth:`shown` (``<tmp>``, ``<parent>``)."""

    @property
    def first_line(self) -> str:
        """The line judged: a refusal is one line, so it is the error."""
        return next(iter(self.stderr.strip().splitlines()), "")

    @property
    def last_line(self) -> str:
        """The line that says what went wrong where the first does not: a traceback's exception, the error
        after a run's log lines."""
        return next(iter(reversed(self.stderr.strip().splitlines())), "")

    def shown(self, line: str) -> str:
        """``line`` with this run's temporary paths named, so a table is the same on every run."""
        for path, name in self.paths.items():
            line = line.replace(path, name)
        return line

    @property
    def verdict(self) -> str:
        """``ok``, or the worst failure: ``traceback``, then ``wrote`` (files written), ``wrong-exit``,
        ``wrong-message`` (the first line of stderr); ``skipped`` where the case could not be made."""
        if self.skipped:
            return "skipped"
        if "Traceback" in self.stdout + self.stderr:
            return "traceback"
        if self.written:
            return "wrote"
        if self.exit != self.case.exit:
            return "wrong-exit"
        return "ok" if re.search(self.case.message, self.first_line) else "wrong-message"

    def explain(self) -> str:
        """A few lines for a failed test: the verdict, the exit, what was written, the end of stderr."""
        more = f" (+{len(self.written) - 5} more)" if len(self.written) > 5 else ""
        return (f"{self.case.name}: {self.verdict}; exit {self.exit}; wrote {self.written[:5]}{more}\n"
                f"expected the first stderr line to match {self.case.message!r}\n--- stderr (end) ---\n"
                f"{self.stderr[-3000:]}")


def snapshot(root: Path, paths: tuple[str, ...]) -> dict[str, tuple[int, int] | None]:
    """Every file under ``paths`` (relative to ``root``) with its size and mtime; directories by presence."""
    seen: dict[str, tuple[int, int] | None] = {}
    for rel in paths:
        top = root / rel
        for p in [top, *top.rglob("*")] if top.is_dir() else [top] if top.exists() else []:
            st = p.lstat()
            seen[p.relative_to(root).as_posix()] = None if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return seen


def run_case(case: Case, parent: Path, tmp: Path, *, timeout: float = TIMEOUT_S) -> Outcome:
    """Make ``case`` in the empty directory ``tmp``, run it, and say what it did."""
    try:
        cmd = case.setup(tmp, parent)
    except Unavailable as e:
        return Outcome(case, None, skipped=str(e))
    before = snapshot(tmp, case.unwritten)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    # its own session, so a command stopped at the timeout goes with everything it started
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    seconds = time.perf_counter() - t0
    after = snapshot(tmp, case.unwritten)
    written = sorted(k for k in before.keys() | after.keys() if before.get(k, "absent") != after.get(k, "absent"))
    return Outcome(case, code, out, err, written, seconds, paths={str(tmp): "<tmp>", str(parent): "<parent>"})


def run_cases(cases: Iterable[Case], parent: Path, root: Path, *, jobs: int = 2, timeout: float = TIMEOUT_S,
              report: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run every case in a directory of its own under ``root``, ``jobs`` at a time (each is a subprocess that
    spends most of its seconds importing torch, so two share 2 cores well); ``report`` hears each as it ends."""

    def one(k: int, case: Case) -> Outcome:
        (root / f"{k:02d}-{case.name}").mkdir(parents=True)
        outcome = run_case(case, parent, root / f"{k:02d}-{case.name}", timeout=timeout)
        if report is not None:
            report(outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda k_case: one(*k_case), enumerate(cases)))
