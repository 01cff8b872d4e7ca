"""The plan's predicted stage times against a run's measured ones (``puzzle plan``'s time column, issue 30).

    python benchmarks/stage_times.py                          # the README's first command (about 15 min on 2 cores)
    python benchmarks/stage_times.py --preset full --budget cpu   # the full preset (about 90 min)
    python benchmarks/stage_times.py --run DIR --name NAME    # a finished run directory (e.g. scale.py --keep DIR)
    python benchmarks/stage_times.py --quick                  # a tiny random parent, under a minute

Runs ``puzzle search`` (or reads ``--run``), then plans the same settings again with today's code, for the child the
run's MIP chose (:func:`puzzle.search.resource_plan.plan_resources`), and puts each stage's predicted seconds beside
the seconds its ``stage.json`` recorded. A torchrun run is planned as its ranks ran (``--cluster Nxcpu``: the cores
split between the ranks). The one-minute load average is sampled every 5 s while the benchmark runs the search (or
read from ``--load-log``, lines of ``EPOCH LOAD1 ...``) and averaged over each stage: on 2 cores another process
slows a stage 2-3x, so the benchmark samples every 5 s the cores that processes outside the search's own group
kept busy, and a stage with more than a quarter of a core of them on average is marked ``quiet = False``.

Writes ``benchmarks/results/stage_times.csv`` (``stage_times_quick.csv`` with ``--quick``), replacing that run name's
rows and keeping the others: run, stage, rank, predicted_s, measured_s, ratio (measured / predicted), checked (the
stage ran over 60 s: the issue's band 0.67-1.5 applies), within, load, quiet, and the machine's fp32 GEMM peak and
copy bandwidth and eager cost per kernel at the run's thread count, the
run's settings and the child its MIP chose (what ``tests/search/test_timing.py`` plans again). Exits 1 when a quiet checked row is outside the band.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BAND = (0.67, 1.5)
QUIET_CORES = 0.25
"""Cores other processes may keep busy beside the search for its stage times to count as quiet."""
CHECKED_S = 60.0
"""Stages shorter than this are reported, not checked (the issue's band applies to stages over a minute)."""


def _busy_ticks() -> int:
    """Clock ticks the cores this process may run on spent busy (``/proc/stat``): all of them, or those it is pinned
    to (``taskset -c 0 python benchmarks/stage_times.py``: a search alone on core 0, the machine's other work
    elsewhere)."""
    mine = os.sched_getaffinity(0)
    total = 0
    for line in Path("/proc/stat").read_text().splitlines()[1:]:
        name, *values = line.split()
        if not name.startswith("cpu"):
            break
        if int(name[3:]) in mine:
            fields = [int(x) for x in values]
            total += sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return total


def _group_ticks(pgid: int) -> int:
    """Clock ticks the processes of session/process group ``pgid`` (the search and its workers) spent on a CPU."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parts = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(parts[2]) == pgid:  # field 5, pgrp
            total += int(parts[11]) + int(parts[12])  # utime, stime
    return total


def sample_load(path: Path, stop: threading.Event, pgid: int, every: float = 5.0) -> None:
    """Write ``EPOCH LOAD1 OTHER`` lines to ``path`` (a new file: one search's log) until ``stop`` is set: OTHER is
    the cores that processes outside the search's group kept busy over the last interval (0: the search ran alone)."""
    hz = os.sysconf("SC_CLK_TCK")
    busy, mine = _busy_ticks(), _group_ticks(pgid)
    with path.open("w") as f:
        while not stop.wait(every):
            now_busy, now_mine = _busy_ticks(), _group_ticks(pgid)
            other = max(0.0, (now_busy - busy) - (now_mine - mine)) / hz / every
            busy, mine = now_busy, now_mine
            f.write(f"{time.time():.0f} {os.getloadavg()[0]:.2f} {other:.2f}\n")
            f.flush()


def run_search(out: Path, flags: list[str], load_log: Path) -> None:
    """``puzzle search FLAGS --out OUT`` in its own process group, what else the machine does sampled beside it."""
    cmd = [sys.executable, "-m", "puzzle.cli.main", "search", *flags, "--out", str(out), "--no-progress"]
    print("$", " ".join(cmd[2:]), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    stop = threading.Event()
    sampler = threading.Thread(target=sample_load, args=(load_log, stop, proc.pid), daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate()
    finally:
        stop.set()
        sampler.join()
    if proc.returncode != 0:
        sys.stderr.write(stdout[-4000:] + stderr[-8000:])
        raise SystemExit(f"the search failed (exit {proc.returncode})")


def stage_load(run: Path, stage: str, seconds: float, log: pd.DataFrame | None) -> tuple[float, float]:
    """``(load, other)``: the mean one-minute load and cores busy outside the search over the stage's span (it ended
    when its ``stage.json`` was written); NaN where the log does not say."""
    if log is None or not len(log):
        return float("nan"), float("nan")
    end = (run / stage / "stage.json").stat().st_mtime
    span = log[(log.t >= end - seconds) & (log.t <= end)]
    if not len(span):
        return float("nan"), float("nan")
    return float(span.load.mean()), float(span.other.mean()) if "other" in span else float("nan")


def run_config(run: Path) -> dict[str, Any]:
    """The settings ``puzzle search`` recorded in ``run/run.json`` (less ``out``); exits with one line when ``run`` is
    not a search's run directory."""
    path = run / "run.json"
    if not path.is_file():
        raise SystemExit(f"--run {run}: no run.json there; name the --out directory of a puzzle search")
    config = json.loads(path.read_text())["config"]
    config.pop("out", None)
    return config


def replan(run: Path) -> tuple[Any, dict[str, Any]]:
    """``(plan, stages)``: the run's settings planned again with today's code, and each stage's use for the child the
    run's MIP chose (fused, for the stages after fusion), as the run itself records it (``puzzle.search.usage``)."""
    from puzzle.loading import load_config
    from puzzle.schema import load_blocks
    from puzzle.search.config import SearchConfig
    from puzzle.search.resolver import resolve
    from puzzle.search.resource_plan import plan_resources

    plan = resolve(SearchConfig.from_dict(run_config(run)))
    chosen = run / "solve" / "blocks.json"
    child = plan.parent_config.with_blocks(load_blocks(chosen)) if chosen.is_file() else None
    fused = load_config(run / "fuse" / "model") if (run / "fuse" / "model" / "config.json").is_file() else child
    plans = {"before": plan.resources, "child": plan_resources(plan, child=child, search=False) if child else None,
             "fused": plan_resources(plan, child=fused, search=False) if fused else None}
    stages = {}
    for use in plan.resources.stages:
        which = "fused" if use.stage in ("gkd", "export", "evaluate") else "child" \
            if use.stage in ("child_bld", "fuse") else "before"
        stages[use.stage] = (plans[which] or plans["before"]).stage(use.stage)
    return plan, stages


def compare(run: Path, name: str, load_log: Path | None, *, shared: bool = False) -> pd.DataFrame:
    """One row per stage and rank of ``run``: today's plan for the chosen child against the measured seconds."""
    from puzzle.profiler.cpu import cached_peaks

    config = run_config(run)
    plan, stages = replan(run)
    chosen = run / "solve" / "blocks.json"
    log = None
    if load_log is not None and load_log.is_file():
        log = pd.read_csv(load_log, sep=r"\s+", header=None)
        log.columns = ["t", "load", "other"][:log.shape[1]]
    threads, peaks = plan.cluster.threads, cached_peaks(plan.cluster.threads or 1) or {}
    rows = []
    for use in plan.resources.stages:
        doc = run / use.stage / "stage.json"
        if not doc.is_file():
            continue
        measured = float(json.loads(doc.read_text()).get("seconds") or 0.0)
        stage = stages[use.stage]
        load, other = stage_load(run, use.stage, measured, log)
        # quiet: under a core's quarter busy beside the search (or, with only the load average, at most a core and
        # a half over the run's threads: a 2-thread search alone reads about 2.7-3.4 on this machine)
        quiet = not shared and (other <= QUIET_CORES if other == other else not load > (threads or 1) + 1.5)
        for r in stage.ranks:
            if r.seconds <= 0:  # a rank without work in this stage
                continue
            ratio = measured / r.seconds
            checked = measured > CHECKED_S
            rows.append({"run": name, "stage": use.stage, "rank": r.rank, "predicted_s": r.seconds,
                         "measured_s": measured, "ratio": ratio, "checked": checked,
                         "within": (not checked) or BAND[0] <= ratio <= BAND[1], "load": load,
                         "other_cores": other, "quiet": quiet, "threads": threads,
                         "fp32_gflops": peaks.get("fp32_flops", float("nan")) / 1e9,
                         "bandwidth_gbs": peaks.get("bandwidth", float("nan")) / 1e9,
                         "kernel_us": peaks.get("kernel_overhead_us", float("nan")),
                         "config": json.dumps(config, sort_keys=True),
                         "child": chosen.read_text() if chosen.is_file() else ""})
    return pd.DataFrame(rows)


def tiny_flags(tmp: Path) -> list[str]:
    """The quick preset on a 6-layer random parent, stage sizes cut to seconds."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.tiny_parent import write_tiny_parent

    parent = write_tiny_parent(tmp / "parent", layers=6)
    return ["--model", str(parent), "--bld-tokens", "8192", "--score-sequences", "1", "--score-seq-len", "32",
            "--fuse-sequences", "1", "--fuse-distill-steps", "2", "--gkd-steps", "2", "--eval-sequences", "1",
            "--no-speed", "--speedup", "1.2", "--engine", "transformers"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a finished run directory to read instead of running a search")
    ap.add_argument("--name", help="the run's name in the CSV (default: from the preset and budget)")
    ap.add_argument("--preset", default="quick", help="search preset (default quick)")
    ap.add_argument("--budget", default="8xH100", help="search budget (default 8xH100, the README's)")
    ap.add_argument("--load-log", type=Path, help="EPOCH LOAD1 [OTHER_CORES] lines sampled beside --run")
    ap.add_argument("--shared", action="store_true",
                    help="--run shared the machine with other work: report its rows, never count them quiet")
    ap.add_argument("--keep", type=Path, help="run directory to keep (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="a tiny random parent: under a minute")
    ap.add_argument("--csv", type=Path, help="CSV path (default: benchmarks/results/stage_times[_quick].csv)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        run, load_log = args.run, args.load_log
        if run is None:
            run = args.keep or Path(tmp) / "run"
            load_log = run.parent / f"{run.name}.load.log"  # kept beside a kept run: `--run DIR --load-log` reads it
            flags = tiny_flags(Path(tmp)) if args.quick else ["--preset", args.preset, "--budget", args.budget]
            run_search(run, flags, load_log)
        name = args.name or ("tiny-quick" if args.quick else f"smollm2-{args.preset}-{args.budget}")
        table = compare(run, name, load_log, shared=args.shared)
    path = args.csv or RESULTS / ("stage_times_quick.csv" if args.quick else "stage_times.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        old = pd.read_csv(path)
        table = pd.concat([old[old.run != name], table], ignore_index=True)
    table.to_csv(path, index=False)
    shown = table[table.run == name].drop(columns=["config", "child"])
    with pd.option_context("display.width", 200, "display.float_format", "{:.2f}".format):
        print(shown.to_string(index=False))
    bad = shown[shown.checked & shown.quiet & ~shown.within]
    print(f"{name}: {int(shown.checked.sum())} stage rows over {CHECKED_S:.0f} s, {len(bad)} outside "
          f"{BAND[0]}-{BAND[1]} on a quiet machine; written {path}")
    return 1 if len(bad) else 0


if __name__ == "__main__":
    sys.exit(main())
