"""Scoring with the parent's layers sharded over torchrun ranks: the same tables as one process, a
killed run resumes per layer, and each rank's peak memory stays within its closed-form plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from block_library.distributed import split_layers
from block_library.memory import PROCESS_BYTES, layer_sizes
from puzzle.model import PuzzleConfig
from puzzle.scoring.memory import FLOAT_BYTES, MMAP_READAROUND_BYTES, score_layer_costs, score_rank_bytes

from .conftest import TINY_SCORE

ROOT = Path(__file__).resolve().parents[2]
METRICS = ["kl", "loss_delta", "top1_disagreement"]



PROCESS_SPREAD = 0.15 * 2**30
"""How far a process's own memory (Python, torch, the test's imports) strays from the plan's
``PROCESS_BYTES`` (0.33-0.48 GiB measured across torchrun ranks and test workers)."""

def _torchrun(args: list[str], *, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _score_cli(lib: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "puzzle.cli.main", "score", str(lib), "--out", str(out), "--seq-len", str(TINY_SCORE["seq_len"]),
            "--sequences", str(TINY_SCORE["num_sequences"]), "--no-progress", *extra]


def _assert_same(got: pd.DataFrame, want: pd.DataFrame, metrics: list[str]) -> None:
    """Equal tables, the metric columns within 1e-5 relative."""
    want = want.reset_index(drop=True)
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got.drop(columns=metrics), want.drop(columns=metrics), check_dtype=False)
    for c in metrics:
        assert got[c].to_numpy() == pytest.approx(want[c].to_numpy(), rel=1e-5, abs=1e-9), c


@pytest.mark.slow  # two processes score the tiny library
def test_two_processes_score_the_same_as_one_within_their_memory_plan(scored_additive, tiny_library, tmp_path):
    out = tmp_path / "scores"
    _torchrun(_score_cli(tiny_library, out))
    _assert_same(pd.read_csv(out / "scores.csv"), scored_additive.scores, METRICS)
    _assert_same(pd.read_csv(out / "subblock_scores.csv"), scored_additive.subblocks,
                 ["kl", "loss_delta", "top1_agreement"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["cost"] == scored_additive.manifest["cost"]
    assert m["inputs"] == scored_additive.manifest["inputs"]
    shards = m["shards"]
    assert shards["world_size"] == 2 and shards["layers"] == [[0, 2], [2, 3]]
    # Each rank's measured peak RSS (VmHWM) against its plan: within it, and not far below it.
    from block_library import open_library

    pc = open_library(tiny_library).parent_config
    sizes = layer_sizes(pc, open_library(tiny_library).config.space)
    for r, (lo, hi) in enumerate(shards["layers"]):
        plan = score_rank_bytes(pc, sizes, range(lo, hi), first=r == 0, last=r == 1,
                                sequences=TINY_SCORE["num_sequences"], seq_len=TINY_SCORE["seq_len"])
        measured = shards["peak_rss_mib"][r] * 2**20
        assert 0.4 * plan < measured <= plan + PROCESS_SPREAD, (r, measured / 2**20, plan / 2**20)


KILLED = """
import sys
from puzzle.scoring import ScoreConfig, score_library


def stop(layer):
    if layer == 1:
        raise SystemExit(3)  # the last rank dies after layer 1's record is saved

score_library(sys.argv[1], sys.argv[2], ScoreConfig(seq_len={seq_len}, num_sequences={num_sequences},
              pairs="exact", variant_batch=3), progress=False, on_layer=stop)
"""


@pytest.mark.slow  # three two-process runs
def test_a_killed_sharded_run_resumes_per_layer(scored_exact, tiny_library, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED.format(**TINY_SCORE)))
    out = tmp_path / "scores"
    r = _torchrun([str(script), str(tiny_library), str(out)], check=False)
    assert r.returncode != 0
    assert sorted(p.name for p in (out / "partial").iterdir()) == ["L000.json", "L001.json"]
    assert not (out / "scores.csv").exists()
    # Resumed (exact pairs: groups of 3 replacements stacked along the batch travel between the ranks).
    _torchrun(_score_cli(tiny_library, out, "--pairs", "exact", "--variant-batch", "3"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["layers_computed_this_run"] == 1
    _assert_same(pd.read_csv(out / "scores.csv"), scored_exact.scores, METRICS)


def _llama70b() -> PuzzleConfig:
    return PuzzleConfig(vocab_size=128256, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672, num_hidden_layers=80)


def test_rank_memory_adds_up():
    pc = _llama70b()
    sizes = layer_sizes(pc)
    ranges = split_layers(score_layer_costs(pc), 8)
    assert [len(r) for r in ranges] == [10] * 8  # identical layers: an even split
    kw = dict(sequences=8, seq_len=256)
    per_rank = [score_rank_bytes(pc, sizes, r, first=i == 0, last=i == 7, **kw) for i, r in enumerate(ranges)]
    middle = per_rank[1]
    assert per_rank[2:7] == [middle] * 5
    H, V, N, T = 8192, 128256, 8, 256
    # The last rank adds the norm, the head, the log-probs and the head's temporaries.
    # The first rank's memory-mapped embedding (4.2 GB): the kernel reads around each of the 2,048 tokens looked up
    # (1 MiB each), 2 GiB of it resident; on a GPU it is copied whole
    assert per_rank[0] - middle == pytest.approx(min(V * H * FLOAT_BYTES, N * T * MMAP_READAROUND_BYTES)) == 2 * 2**30
    gpu = [score_rank_bytes(pc, sizes, ranges[i], first=i == 0, last=i == 7, device="cuda", **kw) for i in (0, 1)]
    assert gpu[0] - gpu[1] == pytest.approx(V * H * FLOAT_BYTES)
    assert per_rank[7] - middle == pytest.approx((H + V * H + N * (T - 1) * V + 5 * 2 * T * V) * FLOAT_BYTES)
    # A middle rank: its 10 parent layers, one layer's own halves and one other variant at a time (loaded as
    # used), the cache (2 streams a layer), and activations.
    parent = 10 * sizes[0].parent_params * FLOAT_BYTES
    variants = (sizes[0].parent_params + max(v.params for v in sizes[0].trainable)) * FLOAT_BYTES
    cache = 2 * 10 * N * T * H * FLOAT_BYTES
    rest = middle - PROCESS_BYTES - parent - variants - cache
    assert 0 < rest < 2 * 2**30
    # A 70B parent in float32 (280 GB) over 8 ranks: each under 80 GB; one rank alone could not hold it.
    assert max(per_rank) < 80e9 and 34e9 < min(per_rank)
    alone = score_rank_bytes(pc, sizes, range(80), first=True, last=True, **kw)
    assert alone > 280e9
    # Exact pairs keep every attention variant's output; stacking K replacements grows the activations.
    assert score_rank_bytes(pc, sizes, ranges[1], first=False, last=False, pairs="exact", **kw) > middle
    assert score_rank_bytes(pc, sizes, ranges[1], first=False, last=False, variant_batch=4, **kw) > middle
