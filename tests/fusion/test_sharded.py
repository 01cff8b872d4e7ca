"""The layer-sharded fusion gives the one-process fusion's segments, report and fused weights.

One process runs in this process (no torchrun); two run under ``torch.distributed.run`` in a
subprocess that calls :func:`main` of this module on every rank.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from puzzle.fusion import FusionConfig, Segment, fuse_and_report, fuse_model
from puzzle.fusion.memory import fuse_layer_costs, fuse_rank_bytes, rank_runs
from puzzle.fusion.runs import split_at_ranks
from puzzle.loading import load_config, load_model, save_runtime
from tests.fusion.tiny import BLOCKS, VOCAB, free, gqa, tiny_model

PROCESS_SPREAD = 0.15 * 2**30
"""How far a process's own memory (Python, torch, the test's imports) strays from the plan's
``PROCESS_BYTES`` (0.33-0.48 GiB measured across torchrun ranks and test workers)."""


ROOT = Path(__file__).resolve().parents[2]
# runs 1-3 and 5-7: with two ranks (split by parameters) rank 0 owns layers 0-3, rank 1 layers 4-7
EIGHT = [gqa(48), free(48), free(64), free(32), gqa(48), free(40), free(24), free(48)]
SMALL = dict(seq_len=16, calib_sequences=4, eval_sequences=4, measure=False, targets=("cpu",))


class ModTokenizer:
    """Token id = 1 + code point mod (VOCAB - 1); EOS = 0."""

    eos_token_id = 0

    def __call__(self, texts, *, add_special_tokens=True, **kwargs):
        return {"input_ids": [[1 + ord(c) % (VOCAB - 1) for c in t] for t in texts]}


def _dirs(tmp_path: Path, blocks: list) -> tuple[Path, Path]:
    """A child with attention-free runs and a parent (all GQA), saved as runtime directories."""
    child, parent = tmp_path / "child", tmp_path / "parent"
    save_runtime(tiny_model(blocks, seed=0), child)
    save_runtime(tiny_model([gqa(48)] * 5, seed=3), parent)
    return child, parent


def _assert_same(expect, report: pd.DataFrame, deps: list[dict], model_dir: Path) -> None:
    """The one-process result ``expect`` against a sharded run's report, dependencies and model."""
    want = expect.report.reset_index(drop=True)
    got = report.reset_index(drop=True)[list(want.columns)]
    assert list(got.segment) == list(want.segment)
    for col in want.columns:
        if col == "segment":
            continue
        for a, b in zip(got[col], want[col]):
            if isinstance(b, float) and math.isnan(b):
                assert math.isnan(a), col
            else:
                assert float(a) == pytest.approx(float(b), abs=1e-5, rel=1e-5), col
    assert [d["run"] for d in deps] == [d.run.label for d in expect.dependencies]
    for d, e in zip(deps, expect.dependencies):
        torch.testing.assert_close(torch.tensor(d["matrix"]), torch.tensor(e.matrix), atol=1e-6, rtol=0)
    fused = load_model(model_dir)
    assert fused.config.blocks == expect.model.config.blocks
    want_state = expect.model.state_dict()
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(v, want_state[k], atol=1e-6, rtol=0, msg=k)


def main(argv: list[str]) -> None:
    """Every rank of a torchrun test: one sharded fusion per ``child parent out config.json`` in ``argv``."""
    from puzzle.fusion.sharded import fuse_sharded
    from puzzle.peak import pin_mmap_threshold

    torch.set_num_threads(1)
    pin_mmap_threshold()  # as a search does: freed weights leave RSS
    for i in range(0, len(argv), 4):
        child, parent, out, kw = argv[i:i + 4]
        fuse_sharded(child, ModTokenizer(), FusionConfig(**json.loads(Path(kw).read_text())), out, parent=parent,
                     progress=False)


def test_runs_are_cut_at_rank_boundaries():
    runs = [Segment(1, 4), Segment(5, 7), Segment(8, 12)]
    ranges = [range(0, 3), range(3, 9), range(9, 14)]
    # 1-3 -> 1-2 (3 alone is not fusable); 5-6 stays; 8-11 -> 8 (dropped) and 9-11
    assert split_at_ranks(runs, ranges) == [Segment(1, 3), Segment(5, 7), Segment(9, 12)]
    config = tiny_model(BLOCKS).config
    assert rank_runs(config, range(0, 3)) == [Segment(1, 3)]
    assert rank_runs(config, range(3, 7)) == [Segment(5, 7)]


def test_one_process_gives_the_fuse_and_report_result(tmp_path):
    from puzzle.fusion.sharded import fuse_sharded

    child, parent = _dirs(tmp_path, BLOCKS)
    cfg = FusionConfig(**{**SMALL, "eval_sequences": 2}, threshold=2.0, max_width_mult=None, max_segment_kl=None,
                       distill_steps=2)
    expect = fuse_and_report(load_model(child), ModTokenizer(), cfg, parent=load_model(parent), progress=False)
    got = fuse_sharded(child, ModTokenizer(), cfg, tmp_path / "out", parent=parent, progress=False)
    assert got.segments == expect.segments == [Segment(1, 4), Segment(5, 7)]
    assert got.distill_losses.keys() == expect.distill_losses.keys()
    for k, v in got.distill_losses.items():
        assert v == pytest.approx(expect.distill_losses[k], rel=1e-5)
    deps = json.loads((tmp_path / "out" / "dependency.json").read_text())["runs"]
    _assert_same(expect, pd.read_csv(tmp_path / "out" / "report.csv"), deps, tmp_path / "out" / "model")
    pd.testing.assert_frame_equal(got.latency, expect.latency)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["segments"] == ["1-3", "5-6"] and manifest["shards"]["world_size"] == 1


def _torchrun(n: int, jobs: list[tuple[Path, Path, Path, dict]], tmp_path: Path) -> None:
    """``n`` processes under torchrun, running :func:`main` on the jobs (child, parent, out, config)."""
    args = []
    for k, (child, parent, out, cfg) in enumerate(jobs):
        kw = tmp_path / f"fusion{k}.json"
        kw.write_text(json.dumps(cfg))
        args += [str(child), str(parent), str(out), str(kw)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "tests.fusion.test_sharded", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow  # two processes under torchrun
def test_two_processes_give_the_one_process_result(tmp_path):
    from block_library.distributed import split_layers

    child, parent = _dirs(tmp_path / "a", EIGHT)
    config = load_config(child)
    ranges = split_layers(fuse_layer_costs(config), 2)
    assert ranges == [range(0, 4), range(4, 8)]  # no run spans the two ranks
    base = dict(SMALL, threshold=2.0, max_width_mult=None, distill_steps=3)
    models = load_model(child), load_model(parent)
    free_run = fuse_and_report(models[0], ModTokenizer(), FusionConfig(**base, max_segment_kl=None),
                               parent=models[1], progress=False)
    kls = free_run.report.set_index("segment").kl
    guard = (kls["1-3"] + kls["5-7"]) / 2  # the KL guard keeps exactly one of the two runs
    cfg = dict(base, max_segment_kl=guard)
    expect = fuse_and_report(models[0], ModTokenizer(), FusionConfig(**cfg), parent=models[1], progress=False)
    assert len(expect.segments) == 1
    # second job: BLOCKS, whose run 1-3 spans rank 0 (layers 0-2) and rank 1 (layers 3-6)
    cut_child, cut_parent = _dirs(tmp_path / "b", BLOCKS)
    cut_cfg = dict(SMALL, threshold=2.0, max_width_mult=None, max_segment_kl=None)
    out, cut_out = tmp_path / "out", tmp_path / "cut"
    _torchrun(2, [(child, parent, out, cfg), (cut_child, cut_parent, cut_out, cut_cfg)], tmp_path)

    deps = json.loads((out / "dependency.json").read_text())["runs"]
    _assert_same(expect, pd.read_csv(out / "report.csv"), deps, out / "model")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["segments"] == [s.label for s in expect.segments]
    assert manifest["distill_losses"].keys() == expect.distill_losses.keys()
    for k, v in manifest["distill_losses"].items():
        assert v == pytest.approx(expect.distill_losses[k], rel=1e-5)
    index = json.loads((out / "model" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    shards = manifest["shards"]
    assert shards["world_size"] == 2 and shards["layers"] == [[0, 4], [4, 8]]
    pconfig = load_config(parent)
    pranges = split_layers(fuse_layer_costs(pconfig), 2)
    for r in range(2):
        plan = fuse_rank_bytes(config, ranges[r], first=r == 0, last=r == 1, calib_sequences=4, eval_sequences=4,
                               seq_len=16, parent=pconfig, parent_layers=pranges[r], distill=True, max_width_mult=None)
        assert shards["peak_rss_mib"][r] * 2**20 <= plan + PROCESS_SPREAD

    # the spanning run is analyzed as 1-2 (rank 0) and 5-6; layer 3 alone on rank 1 is not fusable
    whole = fuse_and_report(load_model(cut_child), ModTokenizer(), FusionConfig(**cut_cfg), progress=False)
    cut = json.loads((cut_out / "dependency.json").read_text())["runs"]
    assert [d["run"] for d in cut] == ["1-2", "5-6"]
    sub = torch.tensor(whole.dependencies[0].matrix)[:2, :2]  # the pairs of 1-2 inside run 1-3
    torch.testing.assert_close(torch.tensor(cut[0]["matrix"]), sub, atol=1e-6, rtol=0)
    assert json.loads((cut_out / "manifest.json").read_text())["segments"] == ["1-2", "5-6"]
    fused = load_model(cut_out / "model")
    exact = fuse_model(load_model(cut_child), [Segment(1, 3), Segment(5, 7)])
    torch.testing.assert_close(fused.state_dict(), exact.state_dict(), atol=0, rtol=0)


@pytest.mark.slow  # a 190 MB child and a 130 MB parent, in a subprocess
def test_memory_formula_bounds_the_measured_peak(tmp_path):
    from block_library.memory import PROCESS_BYTES
    from puzzle.model import PuzzleConfig, PuzzleForCausalLM

    def model(blocks, seed):  # weights dominate what a rank holds, not the process
        torch.manual_seed(seed)
        return PuzzleForCausalLM(PuzzleConfig(vocab_size=4096, hidden_size=512, num_attention_heads=8,
                                              num_key_value_heads=2, intermediate_size=2048, block_configs=blocks,
                                              max_position_embeddings=64)).eval()

    child, parent = tmp_path / "child", tmp_path / "parent"
    save_runtime(model([gqa(2048), *[free(4096)] * 3, gqa(2048), *[free(4096)] * 3], 0), child)
    save_runtime(model([gqa(2048)] * 8, 1), parent)
    cfg = dict(seq_len=32, calib_sequences=4, eval_sequences=2, measure=False, targets=["cpu"], threshold=2.0,
               max_width_mult=None, max_segment_kl=None, distill_steps=1)
    _torchrun(1, [(child, parent, tmp_path / "out", cfg)], tmp_path)
    shards = json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"]
    peak, start = shards["peak_rss_mib"][0] * 2**20, shards["start_rss_mib"][0] * 2**20
    plan = fuse_rank_bytes(load_config(child), range(8), first=True, last=True, calib_sequences=4, eval_sequences=2,
                           seq_len=32, parent=load_config(parent), parent_layers=range(8), distill=True,
                           max_width_mult=None)
    assert peak <= plan + PROCESS_SPREAD
    # what the stage adds to the process: the formula within [0.8, 2] x the measured growth (about 0.5 GB)
    assert 0.8 * (peak - start) <= plan - PROCESS_BYTES <= 2 * (peak - start)


if __name__ == "__main__":
    main(sys.argv[1:])
