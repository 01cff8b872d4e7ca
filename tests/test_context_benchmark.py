"""benchmarks/context.py --quick: the same search at two quality contexts on a tiny random parent, each child judged
at both lengths by the project's evaluator (issue 32)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two tiny searches and four evaluations: about 50 s on 2 cores
def test_the_context_benchmark_searches_at_each_context_and_judges_both(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.context import main

    csv = tmp_path / "context.csv"
    assert main(["--quick", "--keep", str(tmp_path / "runs"), "--csv", str(csv)]) == 0
    df = pd.read_csv(csv)
    assert list(df.context) == [64, 128]
    for r in df.itertuples():
        run = json.loads((tmp_path / "runs" / f"context-{r.context}" / "plan.json").read_text())
        settings = {k: v["value"] for k, v in run["settings"].items()}
        assert settings["quality_context"] == settings["score_seq_len"] == r.context  # searched at its context
        assert r.kl_64 > 0 and r.kl_128 > 0 and r.kl_ratio == pytest.approx(r.kl_128 / r.kl_64)
        assert 0 <= r.top1_128 <= 1 and r.search_s > 0 and r.attention_kept.endswith("/6")
        usage = pd.read_csv(tmp_path / "runs" / f"context-{r.context}" / "resources.csv").set_index("stage")
        for stage in ("score", "child_bld", "gkd"):  # the run's own measured peak over its plan (the same code's)
            want = usage.loc[stage, "measured_peak_gib"] / usage.loc[stage, "predicted_peak_gib"]
            assert getattr(r, f"{stage}_peak_ratio") == pytest.approx(want, rel=1e-6) and 0.3 < want < 3
    with pytest.raises(SystemExit, match="give CONTEXT=DIR"):
        main(["--run", f"64={tmp_path}"])  # not a search's run directory
