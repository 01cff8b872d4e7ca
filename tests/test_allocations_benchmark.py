"""benchmarks/allocations.py: allocations of the same FFN channels, each given the child-stream refit, judged alike
(issue 32: does the search's choice still matter after the refit)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_allocation_spends_the_uniform_ones_channels():
    sys.path.insert(0, str(ROOT))
    from benchmarks.allocations import allocations, search_widths

    search = search_widths(ROOT / "benchmarks" / "results" / "quality.csv", 30)  # the full preset's MIP child
    assert search[:2] == [1536, 1536] and search[-1] == 1536 and sum(search) == 30 * 1152
    out = allocations(search, 1152, 1536)
    assert list(out) == ["uniform", "search", "search_reversed", "ends_whole", "halfway"]
    assert all(sum(ws) == 30 * 1152 and len(ws) == 30 for ws in out.values())
    assert out["search_reversed"] == search[::-1] and out["ends_whole"][0] == out["ends_whole"][-1] == 1536
    assert all(w % 128 == 0 for ws in out.values() for w in ws)  # widths the library holds


@pytest.mark.slow  # a tiny parent's uniform library and five refits: about 30 s on 2 cores
def test_the_benchmark_refits_each_allocation_and_compares_it_with_uniform(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.allocations import main

    csv = tmp_path / "allocations.csv"
    assert main(["--quick", "--csv", str(csv)]) == 0
    df = pd.read_csv(csv)
    assert list(df.allocation) == ["uniform", "search", "search_reversed", "ends_whole", "halfway"]
    assert df.flops_pct.nunique() == 1 and (df.kl > 0).all() and df.top1.between(0, 1).all()
    assert df.vs_uniform.iloc[0] == 0 and df.vs_uniform.tolist() == pytest.approx((df.kl / df.kl[0] - 1).tolist())
    assert (df.refit_tokens == 1024).all()
