"""Reliability: every single-command refusal of issue 31 on the tiny parent, judged as a new user would.

    python benchmarks/reliability.py            # every case (about 3 minutes on 2 busy cores)
    python benchmarks/reliability.py --quick    # the cases marked quick (under a minute)

Each case of ``benchmarks/reliability_cases.py`` (a read-only ``--out``, ``--out FILE/sub``, a config.json
missing ``num_hidden_layers``, corrupt weights, binary data, an impossible constraint, ...) is made in a
temporary directory and run as ``python -m puzzle.cli.main ...`` in a subprocess, ``--jobs`` at a time.
A case passes (verdict ``ok``) when it exits 2 with no traceback, the first line of stderr says what the
case's regular expression asks, and nothing under its directory was written; otherwise the verdict
names the worst failure: ``traceback``, ``wrote``, ``wrong-exit``, ``wrong-message`` (``skipped``: the
machine cannot make the case, e.g. no read-only mount for root). Prints the table, writes
``benchmarks/results/reliability.csv`` (``reliability_quick.csv`` with ``--quick`` or ``--case``; columns
case, exit, message (the first line of stderr), wrote_files, verdict, then why, seconds, last_line (a
traceback's exception), written (the first few paths)) and exits 1 when a case is neither ``ok`` nor ``skipped``.
The same cases are the tests of ``tests/reliability/``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # the checkout's root: benchmarks.reliability_cases, benchmarks.tiny_parent

from benchmarks.reliability_cases import CASES, Case  # noqa: E402
from benchmarks.reliability_run import TIMEOUT_S, Outcome, run_cases  # noqa: E402


def run_all(cases: list[Case], *, jobs: int, timeout: float) -> list[Outcome]:
    """Write the tiny parent once, then run every case in a directory of its own, ``jobs`` at a time."""
    from benchmarks.tiny_parent import write_tiny_parent

    with tempfile.TemporaryDirectory(prefix="puzzle-reliability-") as tmp:
        parent = write_tiny_parent(Path(tmp) / "tiny_parent")
        return run_cases(cases, parent, Path(tmp) / "cases", jobs=jobs, timeout=timeout,
                         report=lambda o: print(f"{o.case.name}: {o.verdict} ({o.seconds:.0f} s)", flush=True))


def table(outcomes: list[Outcome]) -> pd.DataFrame:
    """One row per case: the CSV's columns, in the order the issue names them, then the extras."""
    return pd.DataFrame([{
        "case": o.case.name, "exit": "timeout" if o.exit is None and not o.skipped else o.exit,
        "message": o.shown(o.first_line)[:300], "wrote_files": len(o.written), "verdict": o.verdict,
        "why": o.case.why, "seconds": round(o.seconds, 1), "last_line": o.shown(o.last_line)[:300],
        "written": " ".join(o.written[:3]) + (f" (+{len(o.written) - 3})" if len(o.written) > 3 else "")}
        for o in outcomes])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the cases marked quick (under a minute)")
    ap.add_argument("--case", action="append", default=[], metavar="NAME",
                    help="run only this case (repeatable; written to reliability_quick.csv)")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at a time (default 2)")
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S, help=f"seconds per case (default {TIMEOUT_S:g})")
    ap.add_argument("--out", type=Path, help="CSV path (default: benchmarks/results/reliability[_quick].csv)")
    args = ap.parse_args(argv)

    cases = [c for c in CASES if (not args.quick or c.quick) and (not args.case or c.name in args.case)]
    unknown = set(args.case) - {c.name for c in CASES}
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; the cases are {[c.name for c in CASES]}")
    df = table(run_all(cases, jobs=args.jobs, timeout=args.timeout))

    from puzzle.io import atomic_write_text

    path = args.out or RESULTS / ("reliability_quick.csv" if args.quick or args.case else "reliability.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, df.to_csv(index=False))
    says = df.message.where(df.verdict.isin(["ok", "wrong-message", "wrong-exit"]), df.last_line)
    with pd.option_context("display.width", 250, "display.max_colwidth", 120):  # where it failed: what it said last
        print(df[["case", "why", "exit", "verdict", "wrote_files", "seconds"]].assign(says=says).to_string(index=False))
    bad = df[~df.verdict.isin(["ok", "skipped"])]
    print(f"{len(df) - len(bad)} of {len(df)} cases ok ({(df.verdict == 'skipped').sum()} skipped); written {path}")
    return 1 if len(bad) else 0


if __name__ == "__main__":
    sys.exit(main())
