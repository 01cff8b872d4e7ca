"""Sharded GKD (FSDP2 over 2 gloo processes on the CPU) against one process: same losses, same weights, resume.

The 2-process runs start this file as their worker, with ``torchrun``::

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.distill.test_fsdp OUT MODE
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from puzzle.distill import GKDConfig, distill_child
from puzzle.distill import sharding as sharding_module
from puzzle.distill.losses import validation_sums
from puzzle.distill.memory import gkd_rank_bytes
from puzzle.errors import ConfigError
from puzzle.loading import load_model
from tests.distill.tiny import CharTokenizer, child_of, small, tiny_parent

ROOT = Path(__file__).resolve().parents[2]
# 6 steps of 4 sequences (2 per process), validation at 3 and 6, checkpoints at 2 and 4
CFG = dict(steps=6, lr=1e-3, val_every=3, checkpoint_every=2)
KILL_AT = 5
# The memory run: big enough that the counted terms dominate, micro-batches of one sequence.
MEDIUM = dict(vocab_size=8192, hidden_size=384, num_attention_heads=4, num_key_value_heads=2, intermediate_size=1024,
              num_hidden_layers=6, initializer_range=0.05, max_position_embeddings=128, eos_token_id=0)
MEMORY_CFG = dict(steps=2, seq_len=64, batch=4, micro_batch=1, val_sequences=4, lr=1e-4)


def _torchrun(out: Path, mode: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.distill.test_fsdp", str(out), mode]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_model(directory / "child").state_dict()


def _assert_close_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=rel, atol=rel * float(v.abs().max()), msg=k)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The reference: the same GKD in this one process, unsharded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    parent = tiny_parent()
    out = tmp_path_factory.mktemp("one") / "gkd"
    result = distill_child(child_of(parent), parent, CharTokenizer(), out, small(**CFG), progress=False)
    torch.set_num_threads(before)
    return result


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """2 processes (one start for three runs): ``memory{r}.json`` the measured peak of a medium model; ``a`` the
    tiny run sharded, ``rank{r}.json`` what each process returned; ``ac`` with activation checkpointing.

    glibc keeps freed blocks of a few MB mapped once it has raised its mmap threshold, which hides what is
    live; a fixed threshold returns them (measured on the medium run: 440-570 MB a process -> 246 MB)."""
    out = tmp_path_factory.mktemp("two")
    r = _torchrun(out, "run", env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow  # starts 2 processes (~1 min on 2 busy cores)
def test_two_processes_train_as_one(one, two):
    curve = pd.read_csv(two / "a" / "curve.csv")
    assert list(curve.step) == list(range(7))
    columns = ["train_loss", "train_kl", "train_cos", "val_kl", "val_top1", "val_lm", "val_cos"]
    # every step's losses and every validation, to float rounding (measured: <= 2e-7 relative)
    pd.testing.assert_frame_equal(curve[columns], one.curve[columns], rtol=1e-5, atol=0)
    _assert_close_weights(_weights(two / "a"), one.model.state_dict(), 1e-5)  # measured: <= 2e-6 of each max

    manifest = json.loads((two / "a" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["processes"] == 2
    assert not (two / "a" / "checkpoint").exists()
    returned = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert returned[0] == returned[1]  # every process reports the same metrics and holds the same child
    assert returned[0]["final"] == manifest["final"]
    saved = sum(float(v.double().sum()) for v in _weights(two / "a").values())
    assert returned[0]["weights_sum"] == pytest.approx(saved)

    # activation checkpointing recomputes the same numbers
    pd.testing.assert_frame_equal(pd.read_csv(two / "ac" / "curve.csv"), curve, rtol=1e-6, atol=0)
    _assert_close_weights(_weights(two / "ac"), _weights(two / "a"), 1e-6)


@pytest.mark.slow  # starts 2 processes twice
def test_a_killed_sharded_run_resumes(one, two, tmp_path):
    r = _torchrun(tmp_path, "kill")
    assert r.returncode != 0
    out = tmp_path / "b"
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == 16  # the last checkpoint before the kill
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    shutil.copytree(out, tmp_path / "c")

    r = _torchrun(tmp_path, "resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming GKD at step 4 of 6" in r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_at_step"] == 4 and manifest["status"] == "complete"
    for k, v in _weights(two / "a").items():
        assert torch.equal(_weights(out)[k], v), k  # bit for bit the uninterrupted sharded run
    pd.testing.assert_frame_equal(pd.read_csv(out / "curve.csv"), pd.read_csv(two / "a" / "curve.csv"))

    # the checkpoint holds whole tensors: one process resumes it too (the same run, to float rounding)
    parent = tiny_parent()
    alone = distill_child(child_of(parent), parent, CharTokenizer(), tmp_path / "c", small(**CFG), progress=False)
    assert alone.manifest["resumed_at_step"] == 4
    _assert_close_weights(alone.model.state_dict(), one.model.state_dict(), 1e-5)


@pytest.mark.slow  # starts 2 processes
def test_memory_per_process_is_the_formula(two):
    for rank in (0, 1):
        m = json.loads((two / f"memory{rank}.json").read_text())
        # measured 246 MB a process against 225 MB predicted (one unsharded process: 375 MB predicted)
        assert 0.6 * m["predicted"] < m["measured"] < 1.5 * m["predicted"], m
        assert m["measured"] < m["predicted_one_process"], m


def test_activation_checkpointing_gives_the_same_loss(parent, child, tok, tmp_path, monkeypatch):
    calls = []
    real = sharding_module.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sharding_module, "checkpoint", counted)
    plain = distill_child(child, parent, tok, tmp_path / "plain", small(steps=3, lr=1e-3), progress=False)
    assert not calls
    ckpt = distill_child(child, parent, tok, tmp_path / "ckpt", small(steps=3, lr=1e-3, activation_checkpointing=True),
                         progress=False)
    assert len(calls) >= 3 * 3  # every layer of every training step
    for column in ("train_loss", "train_kl", "train_cos", "val_kl"):
        for a, b in zip(ckpt.curve[column].dropna(), plain.curve[column].dropna()):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-12), column
    _assert_close_weights(ckpt.model.state_dict(), plain.model.state_dict(), 1e-6)
    assert not any("forward" in vars(layer) for layer in ckpt.model.model.layers)  # the returned child is plain
    assert ckpt.manifest["inputs"] == plain.manifest["inputs"]  # not part of the run's identity


def test_the_batch_must_split_over_the_processes(parent, child, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="batch 4 does not split over 3 processes: use a multiple of 3"):
        distill_child(child, parent, tok, tmp_path / "gkd", small(), progress=False)
    assert not (tmp_path / "gkd").exists()


def test_validation_runs_as_many_passes_as_asked(parent, child):
    """A process with fewer (or no) validation sequences runs the others' number of forward passes."""
    ids = torch.randint(0, 128, (3, 16))
    pairs = [(3, 3)]
    whole = validation_sums(child, parent, ids, pairs, chunk=2)
    assert validation_sums(child, parent, ids, pairs, chunk=2, passes=4) == whole
    calls = []
    hook = child.register_forward_hook(lambda *args: calls.append(1))
    empty = validation_sums(child, parent, ids[:0], pairs, chunk=2, passes=2)
    hook.remove()
    assert len(calls) == 2 and set(empty.values()) == {0.0}


def test_the_memory_formula():
    kw = dict(largest_unit_params=1000, micro_batch=2, seq_len=8, hidden=16, layers=4, vocab=100)
    one, two = gkd_rank_bytes(10_000, 20_000, world=1, **kw), gkd_rank_bytes(10_000, 20_000, world=2, **kw)
    # the shards halve, the rest stays; one process gathers no unit (16 B a parameter of the largest)
    assert one - two == pytest.approx((16 * 10_000 + 4 * 20_000) / 2 - 16 * 1000)
    assert gkd_rank_bytes(10_000, 20_000, world=2, checkpointing=True, **kw) < two
    bf16 = gkd_rank_bytes(10_000, 20_000, world=2, dtype_bytes=2, **kw)
    assert two - bf16 == pytest.approx(2 * 20_000 / 2 + 2 * 2 * 8 * 16 * 5)  # parent shard, parent hidden states
    with pytest.raises(ValueError, match="world"):
        gkd_rank_bytes(1, 1, world=0, **kw)


# ---------------------------------------------------------------------------------- the torchrun worker


def _worker(out: Path, mode: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # "resuming GKD at step ..."
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    parent, tok = tiny_parent(), CharTokenizer()
    child = child_of(parent)
    if mode == "run":
        _memory_worker(out, rank)  # first: in a process that has not trained yet
        for name, ckpt in (("a", False), ("ac", True)):
            result = distill_child(child, parent, tok, out / name, small(**CFG, activation_checkpointing=ckpt),
                                   progress=False)
            if name == "a":
                weights_sum = sum(float(v.double().sum()) for v in result.model.state_dict().values())
                (out / f"rank{rank}.json").write_text(json.dumps({"final": result.final, "weights_sum": weights_sum,
                                                                  "initial": result.initial}))
    else:
        def kill(step: int) -> None:
            if mode == "kill" and step == KILL_AT and rank == 0:
                os.kill(os.getpid(), signal.SIGKILL)

        distill_child(child, parent, tok, out / "b", small(**CFG), progress=False, on_step=kill)


def _memory_worker(out: Path, rank: int) -> None:
    from puzzle.fusion.derive import derive_model, without_attention
    from puzzle.model import PuzzleConfig, PuzzleForCausalLM
    from puzzle.peak import peak_rss_bytes, reset_peak, rss_bytes

    torch.manual_seed(0)
    config = PuzzleConfig(**MEDIUM)
    parent = PuzzleForCausalLM(config).eval()
    child = derive_model(parent, without_attention(config.blocks, (1,)))

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    units = [count(layer) for layer in child.model.layers] + [count(child.model.embed_tokens), count(child.lm_head)]
    sizes = dict(largest_unit_params=max(units), micro_batch=1, seq_len=MEMORY_CFG["seq_len"],
                 hidden=config.hidden_size, layers=config.num_hidden_layers, vocab=config.vocab_size)
    peaks: list[int] = []
    base = rss_bytes()
    reset_peak()
    # the peak up to the last step and validation; not the whole child gathered at the end (not counted)
    distill_child(child, parent, CharTokenizer(), out / "m", GKDConfig(**MEMORY_CFG, checkpoint_every=0),
                  progress=False, on_step=lambda step: peaks.append(peak_rss_bytes()))
    (out / f"memory{rank}.json").write_text(json.dumps({
        "measured": peaks[-1] - base,
        "predicted": gkd_rank_bytes(count(child), count(parent), world=2, **sizes),
        "predicted_one_process": gkd_rank_bytes(count(child), count(parent), world=1, **sizes)}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
