"""Layer-sharded child-aware BLD: one rank is ``train_child_blocks`` exactly; two ranks give its weights and held-out
KL, resume after an interruption, and raise one rank's error on every rank; the stage plans it per rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from block_library import build_library, open_library
from puzzle.distill.child_bld import ChildBLDConfig, train_child_blocks
from puzzle.distill.child_bld_sharded import train_child_sharded
from puzzle.evaluation.quality import evaluate_quality
from puzzle.loading import load_model, save_runtime
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig, save_blocks
from tests.block_library.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = dict(tokens=6 * 4 * 32, batch=4, seq_len=32, lr=1e-2, checkpoint_every=2, refit=True)
"""6 steps of 4 sequences of 32 tokens, a checkpoint every 2 steps, the refit (channel selection, drift 0.75) first."""


def _max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each tensor's largest difference relative to its largest magnitude."""
    assert a.keys() == b.keys()
    return {k: float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a}


@pytest.fixture(scope="module")
def case(tiny_text_parent, tmp_path_factory) -> SimpleNamespace:
    """The tiny parent's untrained library, a child of it (layer 0's FFN cut to 48 channels, layer 1's attention to
    one KV head, layer 2's FFN to 64 channels: the refit selects and fits two FFNs, the training moves three
    sub-blocks), training and held-out ids, and the one-process result on them."""
    d = tmp_path_factory.mktemp("child_bld_sharded")
    build_library(str(tiny_text_parent), d / "lib", tiny_config(tokens=512), progress=False)
    lib = open_library(d / "lib")
    blocks = [BlockConfig(attention=AttentionConfig.gqa(2), ffn=FFNConfig.swiglu(48)),
              BlockConfig(attention=AttentionConfig.gqa(1), ffn=FFNConfig.swiglu(96)),
              BlockConfig(attention=AttentionConfig.gqa(2), ffn=FFNConfig.swiglu(64))]
    save_blocks(blocks, d / "blocks.json")
    lib.assemble_to(blocks, d / "child")
    vocab = lib.parent_config.vocab_size
    ids = torch.randint(0, vocab, (24, 32), generator=torch.Generator().manual_seed(1))
    held_out = torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(99))
    torch.save({"ids": ids, "config": SETTINGS}, d / "ids.pt")
    parent = load_model(tiny_text_parent)
    before = evaluate_quality(lib.assemble(blocks), held_out, parent=parent)["kl"]
    one = train_child_blocks(lib.assemble(blocks), parent, ids, ChildBLDConfig(**SETTINGS), directory=d / "one")
    save_runtime(one.model, d / "one" / "child")
    return SimpleNamespace(dir=d, lib=lib, blocks=blocks, parent_dir=Path(tiny_text_parent), parent=parent, ids=ids,
                           held_out=held_out, one=one, kl_before=before,
                           kl=evaluate_quality(one.model, held_out, parent=parent)["kl"])


@pytest.mark.slow  # a library built, three trainings (about 8 s on 2 cores)
def test_one_rank_is_train_child_blocks(case, tmp_path):
    """Without torchrun the sharded path is the one-process training: the same weights, losses, summary and files."""
    got = train_child_sharded((case.lib, case.blocks), case.parent_dir, case.ids, ChildBLDConfig(**SETTINGS),
                              tmp_path / "child", directory=tmp_path)
    assert case.kl < 0.9 * case.kl_before, (case.kl_before, case.kl)  # the training acts
    assert got.trained == case.one.trained == ["L000.ffn", "L001.attention", "L002.ffn"]
    assert got.refit["refit_layers"] == 2 and got.steps == 6 and got.tokens == 6 * 4 * 32
    mine, ref = got.summary(), case.one.summary()
    for k in ("seconds", "tokens_per_s", "refit_seconds"):
        mine.pop(k), ref.pop(k)
    assert mine == ref
    assert (tmp_path / "losses.csv").read_text() == (case.dir / "one" / "losses.csv").read_text()
    for name in ("model.safetensors", "config.json"):  # save_runtime's files, byte for byte
        assert (tmp_path / "child" / name).read_bytes() == (case.dir / "one" / "child" / name).read_bytes(), name
    again = train_child_sharded(case.dir / "child", case.parent_dir, case.ids, ChildBLDConfig(**SETTINGS),
                                tmp_path / "child", directory=tmp_path)  # finished: the checkpoint's weights
    assert again.tokens == 0
    assert (tmp_path / "child" / "model.safetensors").read_bytes() == \
        (case.dir / "one" / "child" / "model.safetensors").read_bytes()


@pytest.mark.slow  # two processes, four trainings each (about 30 s on 2 cores)
def test_two_ranks_give_the_one_process_weights_resume_and_share_errors(case, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.distill.child_bld_sharded_worker", str(case.dir / "lib"), str(case.dir / "blocks.json"),
           str(case.parent_dir), str(case.dir / "child"), str(case.dir / "ids.pt"), str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    ref = case.one.model.state_dict()
    for run in ("library", "resumed"):
        child = load_model(tmp_path / run / "child")
        diff = _max_rel(ref, child.state_dict())
        assert max(diff.values()) <= 1e-5, (run, {k: v for k, v in diff.items() if v > 1e-5})
        kl = evaluate_quality(child, case.held_out, parent=case.parent)["kl"]
        assert kl == pytest.approx(case.kl, rel=0.01), run
        assert (tmp_path / run / "losses.csv").is_file()
        for rank in ranks:  # every rank returns the same summary
            assert rank[run]["trained"] == 3 and rank[run]["first_nmse"] == ranks[0][run]["first_nmse"]
    assert ranks[0]["library"]["first_nmse"] == pytest.approx(case.one.summary()["first_nmse"], rel=1e-5)
    assert all(rank["stopped"] for rank in ranks)
    assert [rank["resumed"]["tokens"] for rank in ranks] == [2 * 4 * 32] * 2  # only steps 5 and 6 ran again
    assert all("child-aware BLD: the loss of layer" in rank["nan"] for rank in ranks)  # raised on both, no hang


def test_the_stage_plans_each_rank_its_layers():
    """On 8 GPUs each rank holds a quarter of the layers of 8B's parent and child, its trained sub-blocks' AdamW state
    and one layer's refit: far less than one process's whole models; the refit's wait makes later ranks longer."""
    from puzzle.search import SearchConfig, resolve

    settings = dict(model="llama-3.1-8b", child_bld_tokens=65536, child_refit=True)
    one = resolve(SearchConfig(cluster="1xH100", max_memory_per_rank="2000GiB", **settings)).resources.stage("child_bld")
    eight = resolve(SearchConfig(cluster="8xH100", **settings)).resources.stage("child_bld")
    assert eight.how.startswith("layer-sharded over 8 ranks") and "refit" in eight.how
    assert [r.layers for r in eight.ranks] == [(4 * r, 4 * r + 4) for r in range(8)]
    assert eight.fits and eight.peak_device_bytes < 0.3 * one.peak_device_bytes
    print(f"8B child-aware BLD: one rank {one.peak_device_bytes / 2**30:.1f} GiB, {one.seconds:.0f} s; 8 ranks "
          f"{eight.peak_device_bytes / 2**30:.1f} GiB, {eight.seconds:.0f} s")
    later = [r.seconds for r in eight.ranks[1:]]
    assert later == sorted(later)  # each waits for the refit of the layers before its own
    assert eight.seconds < one.seconds
    assert eight.ranks[0].disk_bytes > eight.ranks[1].disk_bytes  # rank 0 writes the child too
