"""The parent's cached targets under 2-process FSDP2 GKD, on stored (meta) models as the gkd stage runs them: with
k = the vocabulary the same losses and weights as a live parent, with a small k the same as one process's cached run;
targets of other tokens are refused by the run and replaced in the file.

The 2-process runs start this file as their worker, with ``torchrun``::

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.distill.test_teacher_cache_sharded DIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from puzzle.distill import distill_child
from puzzle.distill.gkd import gkd_train_ids
from puzzle.distill.teacher_cache import load_targets, teacher_targets
from puzzle.errors import ConfigError
from puzzle.loading import load_model, save_runtime
from tests.distill.tiny import VOCAB, CharTokenizer, child_of, small, tiny_parent

ROOT = Path(__file__).resolve().parents[2]
# 4 steps of 4 sequences (2 per process), validation at 0, 2 and 4
CFG = dict(steps=4, lr=1e-3, val_every=2)
TOP_K = 16
TRAIN = ["train_loss", "train_kl", "train_cos", "train_lm"]
VAL = ["val_kl", "val_top1", "val_lm", "val_cos"]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_model(directory / "child").state_dict()


def _assert_close_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=rel, atol=rel * float(v.abs().max()), msg=k)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The tiny parent and its child stored, then one 2-process start (see :func:`_worker`) distilling the child
    live, on exact cached targets and on top-16 ones."""
    d = tmp_path_factory.mktemp("sharded_cache")
    parent = tiny_parent()
    save_runtime(parent, d / "parent")
    save_runtime(child_of(parent), d / "child")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.distill.test_teacher_cache_sharded", str(d)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.fixture(scope="module")
def one(two):
    """The same runs in this one process, on the stored models loaded whole: live, and on top-16 cached targets."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    parent, child, tok, cfg = load_model(two / "parent"), load_model(two / "child"), CharTokenizer(), small(**CFG)
    targets = teacher_targets(parent, gkd_train_ids(cfg, tok), TOP_K, two / "one" / "top16.safetensors")
    runs = {"live": distill_child(child, parent, tok, two / "one" / "live", cfg, progress=False),
            "top16": distill_child(child, parent, tok, two / "one" / "top16", cfg, progress=False, teacher=targets)}
    torch.set_num_threads(before)
    return runs


@pytest.mark.slow  # starts 2 processes (~20 s on 2 busy cores)
def test_exact_cached_targets_train_as_the_live_parent(two, one):
    live, exact = pd.read_csv(two / "live" / "curve.csv"), pd.read_csv(two / "exact" / "curve.csv")
    # every step's losses and every validation, to float rounding: against the live parent on 2 processes and on 1
    # (measured: <= 1.2e-7 relative; weights equal to the 2-process live run's, <= 8e-7 of each max from 1 process's)
    pd.testing.assert_frame_equal(exact[TRAIN + VAL], live[TRAIN + VAL], rtol=1e-5, atol=0)
    pd.testing.assert_frame_equal(exact[TRAIN + VAL], one["live"].curve[TRAIN + VAL], rtol=1e-5, atol=0)
    _assert_close_weights(_weights(two / "exact"), _weights(two / "live"), 1e-5)
    _assert_close_weights(_weights(two / "exact"), one["live"].model.state_dict(), 1e-5)
    manifest = json.loads((two / "exact" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["inputs"]["teacher_top_k"] == VOCAB
    assert "teacher_top_k" not in json.loads((two / "live" / "manifest.json").read_text())["inputs"]


@pytest.mark.slow  # reads the 2-process runs
def test_a_small_k_trains_as_one_processs_cached_run(two, one):
    sharded, alone = pd.read_csv(two / "top16" / "curve.csv"), one["top16"].curve
    # measured: <= 1.9e-7 relative, weights <= 2.1e-7 of each max
    pd.testing.assert_frame_equal(sharded[TRAIN + VAL], alone[TRAIN + VAL], rtol=1e-5, atol=0)
    _assert_close_weights(_weights(two / "top16"), one["top16"].model.state_dict(), 1e-5)
    # the coarsened KL is below the full one on the same (first) batch, and the exact validation KL still falls
    live = pd.read_csv(two / "live" / "curve.csv")
    assert 0 < sharded.train_kl[1] < live.train_kl[1]
    assert one["top16"].final["kl"] < one["top16"].initial["kl"]
    # the stage's file (gkd-top16-sharded) holds the parent's targets, keyed by its stored files
    manifest = json.loads((two / "top16" / "manifest.json").read_text())
    assert manifest["inputs"]["teacher_top_k"] == TOP_K and manifest["processes"] == 2


@pytest.mark.slow  # reads the 2-process runs
def test_targets_of_other_tokens_are_refused_and_replaced(two):
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["reused_same_file"]  # the same key: read back, not computed again
        assert "other tokens or another parent" in seen["stale_error"] and "sharded_targets" in seen["stale_error"]
    # each rank read the rows it trains on: half the file each, together all of it
    held = [set(seen.pop("held")) for seen in ranks]
    assert len(held[0]) == len(held[1]) == ranks[0]["rows"] // 2 and held[0] | held[1] == set(range(ranks[0]["rows"]))
    assert ranks[0] == ranks[1]
    assert ranks[0]["stale_key"] != ranks[0]["key"]
    # the file of the stage's path now holds the other tokens' targets (16-token sequences), recomputed
    stored = load_targets(two / "shared" / "teacher" / f"gkd-top{TOP_K}-sharded.safetensors")
    assert stored.key == ranks[0]["stale_key"] and stored.logp.shape[1:] == (15, TOP_K)
    assert not (two / "stale").exists()


# ---------------------------------------------------------------------------------- the torchrun worker


class _Plan:
    """The settings :class:`GKDSettings` reads, as a resolved plan gives them."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k

    def value(self, name: str) -> object:
        return {"gkd_top_k": self.top_k}.get(name)


def _worker(d: Path) -> None:
    from block_library.distributed import init_shard
    from puzzle.distill.artifact import files_fingerprint
    from puzzle.distill.teacher_sharded import sharded_targets
    from puzzle.loading import load_layers
    from puzzle.search.stages.gkd import GKDStage

    torch.set_num_threads(1)
    shard = init_shard([1.0, 1.0])
    tok, cfg = CharTokenizer(), small(**CFG)
    parent, child = load_layers(d / "parent", []), load_layers(d / "child", [])  # on meta, as the stage has them
    sha = files_fingerprint(parent)
    distill_child(child, parent, tok, d / "live", cfg, progress=False)

    # k = the vocabulary, hidden states in float32: the live parent's objective exactly
    path = d / "teacher" / "exact.safetensors"
    exact = sharded_targets(d / "parent", gkd_train_ids(cfg, tok), VOCAB, path, shard=shard, parent_sha256=sha,
                            hidden_dtype=torch.float32)
    distill_child(child, parent, tok, d / "exact", cfg, progress=False, teacher=exact)
    stamp = path.stat().st_mtime_ns
    again = sharded_targets(d / "parent", gkd_train_ids(cfg, tok), VOCAB, path, shard=shard, parent_sha256=sha)
    reused = path.stat().st_mtime_ns == stamp and torch.equal(again.logp, exact.logp)

    # a small k, by the stage's own call (its path and key, bf16 hidden states)
    ctx = SimpleNamespace(plan=_Plan(TOP_K), world=2, shared_dir=d / "shared", source=d / "parent", tokenizer=tok,
                          progress=False)
    top16 = GKDStage().sharded_teacher(ctx, cfg, parent)
    distill_child(child, parent, tok, d / "top16", cfg, progress=False, teacher=top16)

    # targets of other tokens (16-token sequences) at the stage's path: recomputed there, and refused by the run
    stale = GKDStage().sharded_teacher(ctx, small(**CFG, seq_len=16), parent)
    try:
        distill_child(child, parent, tok, d / "stale", cfg, progress=False, teacher=stale)
        error = ""
    except ConfigError as e:
        error = str(e)
    rank = int(os.environ["RANK"])
    (d / f"rank{rank}.json").write_text(json.dumps({"reused_same_file": reused, "key": top16.key,
                                                    "held": top16.held.tolist(), "rows": cfg.steps * cfg.batch,
                                                    "stale_key": stale.key, "stale_error": error}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
