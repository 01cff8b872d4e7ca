"""`puzzle search` under 2-process torchrun: every stage on both ranks, the plan against the measured peaks.

Runs ``benchmarks/scale.py --quick`` (a 4-layer Llama-3.2-shaped random parent, 2 ranks of 2.5 GiB:
library and BLD sharded by layers, scoring streamed through the ranks, FSDP2 GKD, streamed export,
sharded evaluation) and checks what it wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two processes through all ten stages: about 4 min on 2 cores
def test_two_rank_search_runs_every_stage_within_its_plan(tmp_path):
    run, csv = tmp_path / "run", tmp_path / "scale.csv"
    proc = subprocess.run([sys.executable, "benchmarks/scale.py", "--quick", "--keep", str(run), "--out", str(csv)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: off the plan (checked below)
    usage = pd.read_csv(run / "resources.csv")
    stages = ["library", "bld", "score", "profile", "solve", "child_bld", "fuse", "gkd", "export", "evaluate"]
    assert list(dict.fromkeys(usage.stage)) == stages and set(usage["rank"]) == {0, 1}
    assert not usage.skipped.any()
    # no rank ever held more than its limit; where a rank works, the plan tracks it (measured 0.90-1.13 of the plan
    # at this shape, where the process itself, 0.53-0.65 GiB, is most of a rank: benchmarks/scale.py checks 15%)
    from block_library.memory import PROCESS_BYTES

    assert (usage.measured_peak_gib <= 2.5).all()
    working = usage[usage.predicted_peak_gib > PROCESS_BYTES / 2**30 + 0.05]
    ratio = working.measured_peak_gib / working.predicted_peak_gib
    assert len(working) >= 9 and ratio.between(0.8, 1.2).all(), working
    plan = json.loads((run / "plan.json").read_text())
    assert plan["resources"]["cluster"]["ranks"] == 2 and plan["resources"]["fits"]
    # the child: exported as DeciLM, GKD'd over 2 ranks, evaluated by the sharded evaluation
    from puzzle.loading import load_config

    assert load_config(run / "export" / "model").num_hidden_layers == 4
    gkd = json.loads((run / "gkd" / "gkd" / "manifest.json").read_text())
    assert gkd["processes"] == 2 and gkd["status"] == "complete"
    quality = json.loads((run / "evaluate" / "evaluation.json").read_text())["quality"]
    assert quality["kl"] > 0 and 0 <= quality["top1_agreement"] <= 1
    # a rerun on the same ranks skips every stage and keeps the measured rows
    sys.path.insert(0, str(ROOT))
    from benchmarks.scale import run_search, search_setup

    model, memory, flags = search_setup(True, tmp_path)
    run_search(model, run, ranks=2, memory=memory, flags=flags, timeout=900)
    again = pd.read_csv(run / "resources.csv")
    pd.testing.assert_frame_equal(again, usage)
