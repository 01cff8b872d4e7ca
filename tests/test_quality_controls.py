"""benchmarks/quality_controls.py: uniform pruning given the search's child-stream refit and child-aware BLD, merged
into quality.csv beside the rows it controls (issue 32, item 4)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a tiny parent's uniform library, two refits and two trainings: about 20 s on 2 cores
def test_the_controls_refit_and_train_uniform_pruning_and_replace_only_their_rows(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.quality_controls import controls, merged
    from benchmarks.tiny_parent import write_tiny_parent

    write_tiny_parent(tmp_path / "parent")
    df = controls(tmp_path, quick=True, preset="quick", seed=0, fractions=[0.75, 0.5], tokens=1024, label="t")
    assert list(df.method) == ["uniform_ffn_child_refit", "uniform_ffn_child_bld"] * 2
    assert df.budget.nunique() == 2 and (df.kl > 0).all() and df.top1.between(0, 1).all()
    assert df.detail.str.contains("child-stream refit").all()
    old = pd.DataFrame([{"preset": "t", "seed": 0, "budget": df.budget[0], "method": "uniform_ffn_child_bld",
                         "kl": 9.0},  # replaced
                        {"preset": "t", "seed": 0, "budget": df.budget[0], "method": "puzzle_search_child_bld",
                         "kl": 0.1}])  # kept
    path = tmp_path / "quality.csv"
    old.to_csv(path, index=False)
    out = merged(path, df)
    assert len(out) == 5 and 9.0 not in set(out.kl) and 0.1 in set(out.kl)
