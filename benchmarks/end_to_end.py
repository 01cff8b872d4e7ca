"""``puzzle search`` end to end: wall time and peak process memory of each stage.

    python benchmarks/end_to_end.py [--quick] [--budget 8xH100] [--model smollm2-135m] [--preset quick]
                                    [--out RUN_DIR] [--csv PATH]

Runs the README's first command (SmolLM2-135M, quick preset, ``--budget 8xH100``) through the
Python API (``puzzle.search``) into a fresh temporary run directory, and reports per stage its
seconds (``SearchRun.stages[stage].seconds``) and the process's peak RSS while it ran. RSS is
sampled every 50 ms in a background thread (``/proc/self/status`` VmRSS, else psutil) and each
sample goes to the stage running at that moment: a stage runs from the previous stage's end
(the pipeline's ``echo`` callback fires as each stage ends) to its own end. The total row is the
whole call's wall time (the report included) and peak RSS. ``--out`` reuses a run directory, whose
up-to-date stages are then skipped (``skipped`` column). About 15 minutes on 2 CPU cores.

``--quick``: the same pipeline on a random 6-layer parent (hidden 64, SmolLM2's tokenizer) with
tiny stage sizes, no GKD steps and no speed measurement, under a minute on 2 idle cores; it writes
``end_to_end_quick.csv``, so that it never replaces the full run's figures. Prints the table and
writes ``benchmarks/results/end_to_end.csv`` (columns stage, seconds, peak_rss_gib, skipped, and
the run's model, budget, preset, quick, threads).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's root: benchmarks.tiny_parent

from benchmarks.tiny_parent import write_tiny_parent  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# --quick stage sizes: a few hundred tokens per stage; GKD (whose validation alone takes half a minute)
# only saves the child, and the evaluation does not time parent and child
QUICK = dict(bld_tokens=4 * 8 * 256, score_sequences=1, score_seq_len=32, fuse_sequences=1, fuse_distill_steps=2,
             gkd_steps=0, eval_sequences=1, measure_speed=False, speedup=1.2,
             engine="transformers")  # the tiny parent's FFN 96 is no multiple of 256: only transformers loads it


def rss_bytes() -> int | None:
    """This process's resident set size now, or None where neither /proc nor psutil can tell."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # "VmRSS:   123456 kB"
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process(os.getpid()).memory_info().rss)


class RssSampler(threading.Thread):
    """Samples ``(time.perf_counter(), rss_bytes)`` every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval, self.samples = interval, [(time.perf_counter(), rss_bytes())]
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.samples.append((time.perf_counter(), rss_bytes()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.samples.append((time.perf_counter(), rss_bytes()))

    def peak_gib(self, start: float, end: float) -> float:
        """Largest RSS sampled in ``[start, end]`` (NaN without samples or without a way to read RSS)."""
        values = [r for t, r in self.samples if start <= t <= end and r is not None]
        return max(values) / 2**30 if values else float("nan")


def measure(run_dir: Path, sampler: RssSampler, **config: object) -> pd.DataFrame:
    """Run the search into ``run_dir`` and return one row per stage and a total row."""
    import puzzle

    ends: list[float] = []

    def echo(line: str) -> None:
        ends.append(time.perf_counter())
        print(line, flush=True)

    t0 = time.perf_counter()
    run = puzzle.search(run_dir=run_dir, progress=False, echo=echo, **config)
    t1 = time.perf_counter()
    rows, start = [], t0
    for (name, stage), end in zip(run.stages.items(), ends):  # stages in the order they ran
        rows.append({"stage": name, "seconds": stage.seconds, "peak_rss_gib": sampler.peak_gib(start, end),
                     "skipped": stage.skipped})
        start = end
    rows.append({"stage": "total", "seconds": t1 - t0, "peak_rss_gib": sampler.peak_gib(t0, t1),
                 "skipped": all(r["skipped"] for r in rows)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a random 6-layer parent, tiny stage sizes (under a minute)")
    ap.add_argument("--model", default="smollm2-135m", help="parent (default smollm2-135m; ignored with --quick)")
    ap.add_argument("--budget", default="8xH100", help="target hardware, as puzzle search --budget (default 8xH100)")
    ap.add_argument("--preset", default="quick", choices=("quick", "full"), help="stage sizes (default quick)")
    ap.add_argument("--out", default=None, help="run directory (default: a fresh temporary one, deleted after)")
    ap.add_argument("--csv", default=None, help="where to write the table (default benchmarks/results/"
                    "end_to_end.csv; end_to_end_quick.csv with --quick)")
    args = ap.parse_args(argv)
    csv = Path(args.csv) if args.csv else RESULTS / ("end_to_end_quick.csv" if args.quick else "end_to_end.csv")

    import torch

    sampler = RssSampler()
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="puzzle-e2e-") as tmp:
        run_dir = Path(args.out) if args.out else Path(tmp) / "run"
        model = str(write_tiny_parent(Path(tmp) / "tiny", layers=6)) if args.quick else args.model
        config = {"model": model, "budget": args.budget, "preset": args.preset, **(QUICK if args.quick else {})}
        table = measure(run_dir, sampler, **config)
    sampler.stop()
    table.insert(0, "model", "tiny-6-layer" if args.quick else args.model)
    table = table.assign(budget=args.budget, preset=args.preset, quick=args.quick,
                         threads=torch.get_num_threads())
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(table[["stage", "seconds", "peak_rss_gib", "skipped"]].to_string(index=False))
    csv.parent.mkdir(parents=True, exist_ok=True)
    table.round(3).to_csv(csv, index=False)
    print(f"model {table.model[0]}, budget {args.budget}, preset {args.preset}, {table.threads[0]} threads; "
          f"wrote {csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
