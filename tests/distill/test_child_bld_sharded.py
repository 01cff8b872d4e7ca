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


@pytest.mark.slow  # two processes, seven trainings each (about 16 s on 2 cores)
def test_two_ranks_give_the_one_process_weights_resume_and_share_errors(case, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.distill.child_bld_sharded_worker", str(case.dir / "lib"), str(case.dir / "blocks.json"),
           str(case.parent_dir), str(case.dir / "child"), str(case.dir / "ids.pt"), str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    ref = case.one.model.state_dict()
    for run in ("library", "resumed", "rounds", "rounds_resumed"):
        child = load_model(tmp_path / run / "child")
        diff = _max_rel(ref, child.state_dict())
        kl = evaluate_quality(child, case.held_out, parent=case.parent)["kl"]
        print(f"2 ranks, {run}: max rel diff {max(diff.values()):.3g}, KL {kl:.6f} vs {case.kl:.6f}")
        assert max(diff.values()) <= 1e-5, (run, {k: v for k, v in diff.items() if v > 1e-5})
        assert kl == pytest.approx(case.kl, rel=0.01), run
        assert (tmp_path / run / "losses.csv").read_text() == (case.dir / "one" / "losses.csv").read_text()
        for rank in ranks:  # every rank returns the same summary
            assert rank[run]["trained"] == 3 and rank[run]["first_nmse"] == ranks[0][run]["first_nmse"]
    assert ranks[0]["library"]["first_nmse"] == pytest.approx(case.one.summary()["first_nmse"], rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "rounds" / "ckpt" / "rank0").iterdir()) == ["L000", "L001"]
    assert all(rank["stopped"] and rank["rounds_stopped"] for rank in ranks)
    for run in ("resumed", "rounds_resumed"):  # only steps 5 and 6 ran again (rounds: 4 is a resume step of 2 ranks)
        assert [rank[run]["tokens"] for rank in ranks] == [2 * 4 * 32] * 2, run
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


STEP_BYTES = 4 * 32 * 64 * 4
"""One step's stream of the tiny parent (4 sequences of 32 tokens, hidden 64, float32): windows are counted in it."""


@pytest.mark.slow  # three trainings in rounds (about 7 s on 2 cores)
def test_rounds_give_the_weights_of_one_round_and_resume_mid_window(case, tmp_path):
    """One rank, each layer a round (a byte budget no layer fits, then at most one layer a round; the refit one
    layer at a time), windows of 2 then 4 steps: the one-process weights, losses and KL; a run stopped inside a
    window resumes from the window every round has finished."""
    def train(run: str, window_steps: int, **kw):
        return train_child_sharded((case.lib, case.blocks), case.parent_dir, case.ids, ChildBLDConfig(**SETTINGS),
                                   tmp_path / run / "child", directory=tmp_path / run,
                                   window_bytes=window_steps * STEP_BYTES, **kw)

    got = train("rounds", 2, budget=1.0)
    assert sorted(p.name for p in (tmp_path / "rounds" / "ckpt" / "rank0").iterdir()) == ["L000", "L001", "L002"]
    child = load_model(tmp_path / "rounds" / "child")
    diff = _max_rel(case.one.model.state_dict(), child.state_dict())
    kl = evaluate_quality(child, case.held_out, parent=case.parent)["kl"]
    print(f"3 rounds, windows of 2 steps: max rel diff {max(diff.values()):.3g}, KL {kl:.6f} vs {case.kl:.6f}")
    assert max(diff.values()) <= 1e-5, {k: v for k, v in diff.items() if v > 1e-5}
    assert kl == pytest.approx(case.kl, rel=1e-4)
    assert (tmp_path / "rounds" / "losses.csv").read_text() == (case.dir / "one" / "losses.csv").read_text()
    assert got.summary()["first_nmse"] == case.one.summary()["first_nmse"] and got.refit["refit_layers"] == 2

    def stop_inside_the_second_window(step: int) -> None:
        if step == 4:  # window [4, 6): rounds 0 and 1 are done with it, round 2 has done step 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("resumed", 4, max_round_layers=1, on_step=stop_inside_the_second_window)
    again = train("resumed", 4, max_round_layers=1)
    assert again.tokens == 2 * 4 * 32  # from step 4: the end of the first window, which every round holds
    resumed = load_model(tmp_path / "resumed" / "child").state_dict()
    assert max(_max_rel(child.state_dict(), resumed).values()) == 0.0
    assert (tmp_path / "resumed" / "losses.csv").read_text() == (case.dir / "one" / "losses.csv").read_text()


@pytest.mark.slow  # two refits and two trainings (about 2 s on 2 cores)
def test_the_refit_reads_only_the_first_rows_up_to_its_cap(case, tmp_path, monkeypatch):
    """Under a cap of 2 sequences the refit of all 24 is the refit of the first 2, in one process and one layer at a
    time (rounds), and the training after it is the same in both."""
    from puzzle.distill import child_refit

    first_two = case.lib.assemble(case.blocks)
    child_refit.refit_child_ffns(first_two, case.parent, case.ids[:2], drift=0.75)
    monkeypatch.setattr(child_refit, "REFIT_MAX_TOKENS", 2 * 32 + 31)  # two rows of 32 tokens
    capped = case.lib.assemble(case.blocks)
    result = child_refit.refit_child_ffns(capped, case.parent, case.ids, drift=0.75)
    assert result.tokens == 2 * 32
    assert max(_max_rel(first_two.state_dict(), capped.state_dict()).values()) == 0.0
    one = train_child_blocks(case.lib.assemble(case.blocks), case.parent, case.ids, ChildBLDConfig(**SETTINGS))
    got = train_child_sharded((case.lib, case.blocks), case.parent_dir, case.ids, ChildBLDConfig(**SETTINGS),
                              tmp_path / "child", directory=tmp_path, max_round_layers=1)
    assert got.refit["refit_tokens"] == one.refit["refit_tokens"] == 2 * 32
    diff = _max_rel(one.model.state_dict(), load_model(tmp_path / "child").state_dict())
    assert max(diff.values()) <= 1e-5
    assert max(_max_rel(one.model.state_dict(), case.one.model.state_dict()).values()) > 1e-3  # the cap acts


def test_rounds_fit_a_byte_budget_and_balance():
    """The fewest rounds that fit, balanced; one round when everything fits; a layer too large alone."""
    from puzzle.distill.child_bld_memory import split_rounds, window_steps

    ten = split_rounds([1.0] * 10, 3.0)  # greedy would leave 3, 3, 3, 1
    assert [l for r in ten for l in r] == list(range(10)) and sorted(len(r) for r in ten) == [2, 2, 3, 3]
    assert split_rounds([3.0, 1.0, 1.0, 3.0, 2.0], 5.0) == [range(0, 3), range(3, 5)]
    assert split_rounds([1.0] * 4, 100.0) == [range(0, 4)] and split_rounds([1.0] * 4, 100.0, 3) == [range(0, 2),
                                                                                                    range(2, 4)]
    assert split_rounds([1.0, 9.0, 1.0], 2.0) == [range(0, 1), range(1, 2), range(2, 3)]
    # windows: the steps whose streams stay under the bound (a multiple of checkpoint_every when one fits), at least
    # one step, at most the run
    assert window_steps(1000, 4, 2**25) == 32 and window_steps(1000, 4, 2**28 + 1) == 3
    assert window_steps(1000, 4, 2**31) == 1 and window_steps(6, 4, 1) == 8
    assert window_steps(6, 2, 1.0) == 6


@pytest.mark.slow  # four refits of the tiny child (about 2 s on 2 cores)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_the_refit_with_its_gram_in_host_ram_gives_the_device_weights(case, device, monkeypatch):
    """``host``: G, C and the OBS elimination in host RAM (float64), each chunk's sums from the model's device: the
    same weights as with them on the device, with channel selection and without (on the CPU the same processor)."""
    from puzzle.distill import channel_select, child_refit

    seen = []
    obs = channel_select.obs_select
    monkeypatch.setattr(channel_select, "obs_select", lambda g, *a, **k: seen.append(g.device.type) or obs(g, *a, **k))
    for select in (True, False):
        got = {}
        for host in (False, True):
            child = case.lib.assemble(case.blocks).to(device)
            child_refit.refit_child_ffns(child, case.parent.to(device), case.ids, drift=0.75, select=select, host=host)
            got[host] = {k: v.cpu() for k, v in child.state_dict().items()}
        diff = _max_rel(got[False], got[True])
        print(f"refit on {device}, select {select}: host vs device max rel diff {max(diff.values()):.3g}")
        assert max(diff.values()) <= 1e-6, {k: v for k, v in diff.items() if v > 1e-6}
    case.parent.to("cpu")
    assert seen == [device] * 2 + ["cpu"] * 2  # two refit layers each: on the device, then on the host
