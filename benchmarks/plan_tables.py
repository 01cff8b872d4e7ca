"""The resource plan on paper: `puzzle plan` for Llama-3.1-8B, 70B and 405B on 1x, 8x and 64xH100.

    python benchmarks/plan_tables.py           # 3 parents x 3 clusters, the full preset, and the production
                                               # preset for 8B and 70B on 8xH100; markdown tables
    python benchmarks/plan_tables.py --quick   # Llama-3.1-8B only

Predictions, not measurements: closed-form counts from each model's config (no weights), the
datasheet H100 (80 GB, 90% usable per rank; 35% of the bf16 peak in training kernels) and the
`full` preset's stage sizes. Prints one markdown table per parent (per stage: peak device memory
of the largest rank, BLD rounds, predicted time) and writes benchmarks/results/plan_tables.csv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results" / "plan_tables.csv"
PARENTS = ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b")
CLUSTERS = ("1xH100", "8xH100", "64xH100")
PRODUCTION = (("llama-3.1-8b", "8xH100"), ("llama-3.1-70b", "8xH100"))
"""The production preset's plans (token counts that grow with the parent): a node of 8 H100s."""


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 36 else f"{seconds:.0f} s"


def plan_rows(parent: str, cluster: str, preset: str = "full") -> list[dict]:
    from puzzle.search import SearchConfig, resolve

    plan = resolve(SearchConfig(model=parent, cluster=cluster, preset=preset))
    r = plan.resources
    rows = []
    for s in r.stages:
        rows.append({"preset": preset, "parent": parent, "cluster": cluster, "stage": s.stage,
                     "peak_device_gib": s.peak_device_bytes / 2**30,
                     "peak_host_gib": s.peak_host_bytes / 2**30, "rounds": s.rounds, "predicted_s": s.seconds,
                     "fits": s.fits, "how": s.how, "smallest_cluster": r.smallest})
    return rows


def markdown(df: pd.DataFrame, parent: str | None = None, preset: str = "full") -> str:
    """One table: the stages of ``parent`` on every cluster, or with ``parent`` None every parent of ``preset``."""
    if parent is None:
        return _by_parent(df[df.preset == preset])
    part = df[(df.parent == parent) & (df.preset == preset)]
    clusters = list(dict.fromkeys(part.cluster))
    head = "| stage | " + " | ".join(clusters) + " |\n|---|" + "---|" * len(clusters) + "\n"
    lines = []
    for stage in dict.fromkeys(part.stage):
        cells = []
        for c in clusters:
            row = part[(part.stage == stage) & (part.cluster == c)].iloc[0]
            rounds = f", {row.rounds} rounds" if row.rounds > 1 else ""
            mark = "" if row.fits else " **does not fit**"
            cells.append(f"{row.peak_device_gib:.1f} GiB{rounds}, {hours(row.predicted_s)}{mark}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    verdicts = []
    for c in clusters:
        rows = part[part.cluster == c]
        ok = rows.fits.all()
        smallest = rows.smallest_cluster.iloc[0]
        verdicts.append("fits" if ok else f"refused: smallest that fits {smallest}" if isinstance(smallest, str)
                        else "refused: no cluster of this GPU fits")
    lines.append("| **plan** | " + " | ".join(verdicts) + " |")
    return head + "\n".join(lines)


def _by_parent(part: pd.DataFrame) -> str:
    """Columns: ``parent on cluster``; rows: the stages (device memory of the largest rank, predicted time)."""
    cols = list(dict.fromkeys(zip(part.parent, part.cluster)))
    head = "| stage | " + " | ".join(f"{p} on {c}" for p, c in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    lines = []
    for stage in dict.fromkeys(part.stage):
        cells = []
        for p, c in cols:
            row = part[(part.stage == stage) & (part.parent == p) & (part.cluster == c)].iloc[0]
            mark = "" if row.fits else " **does not fit**"
            cells.append(f"{row.peak_device_gib:.1f} GiB, {hours(row.predicted_s)}{mark}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    totals = [hours(part[(part.parent == p) & (part.cluster == c)].predicted_s.sum()) for p, c in cols]
    lines.append("| **total** | " + " | ".join(totals) + " |")
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Llama-3.1-8B only")
    ap.add_argument("--out", type=Path, default=RESULTS, help="CSV path")
    args = ap.parse_args(argv)
    parents = PARENTS[:1] if args.quick else PARENTS
    rows = [row for p in parents for c in CLUSTERS for row in plan_rows(p, c)]
    rows += [row for p, c in PRODUCTION if p in parents for row in plan_rows(p, c, "production")]
    df = pd.DataFrame(rows)
    for p in parents:
        print(f"\n{p} (`puzzle plan --model {p} --cluster N --preset full`; predictions):\n")
        print(markdown(df, p))
    print("\nthe production preset (`puzzle plan --model PARENT --cluster 8xH100 --preset production`):\n")
    print(markdown(df, preset="production"))
    if not args.quick or args.out != RESULTS:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)
        print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
