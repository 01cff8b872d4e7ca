"""The teacher-targets file written a chunk at a time and read a rank's rows at a time: the same bytes as the
whole-file writer, only the asked rows read back, each rank's rows those its GKD steps visit."""

from __future__ import annotations

import pytest
import torch

from puzzle.distill.config import GKDConfig
from puzzle.distill.gkd import train_rows, val_rows, visit_order
from puzzle.distill.targets_file import TargetsWriter, read_rows
from puzzle.distill.teacher_cache import FORMAT, TeacherTargets, load_targets, save_targets
from puzzle.errors import CorruptArtifactError

N, T, K, H = 7, 5, 3, 4


def _targets(labels: bool) -> TeacherTargets:
    g = torch.Generator().manual_seed(0)
    return TeacherTargets(torch.randn(N, T - 1, K, generator=g), torch.randint(0, 50, (N, T - 1, K), generator=g),
                          torch.randn(N, T - 1, generator=g), torch.randn(N, T, H, generator=g).bfloat16(), "key-1",
                          torch.randn(N, T - 1, generator=g) if labels else None)


@pytest.mark.parametrize("labels", [False, True])
def test_chunks_written_out_of_order_read_back_as_the_whole_file(tmp_path, labels):
    from block_library.artifact import write_state

    t = _targets(labels)
    tensors = {"logp": t.logp, "index": t.index.to(torch.int32), "rest": t.rest, "hidden": t.hidden,
               **({"label": t.label} if labels else {})}  # safetensors' own writer: the reference layout
    write_state(tensors, tmp_path / "whole.safetensors", metadata={"format": FORMAT, "key": "key-1"})
    with TargetsWriter(tmp_path / "chunks.safetensors", n=N, seq_len=T, top_k=K, hidden_size=H, key="key-1",
                       labels=labels, fmt=FORMAT) as w:
        for start in (4, 0, 2, 6):  # chunks of 2 (the last of 1), in any order
            r = slice(start, min(start + 2, N))
            w.write(start, t.logp[r], t.index[r], t.rest[r], t.hidden[r], t.label[r] if labels else None)
    whole, chunks = load_targets(tmp_path / "whole.safetensors"), load_targets(tmp_path / "chunks.safetensors")
    for name in ("logp", "index", "rest", "hidden") + (("label",) if labels else ()):
        assert torch.equal(getattr(chunks, name), getattr(whole, name)), name
    assert chunks.key == "key-1" and chunks.held is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_a_rank_reads_its_rows_only_and_maps_the_file_rows(tmp_path):
    t = _targets(True)
    save_targets(t, tmp_path / "t.safetensors")  # one piece, through the same writer
    assert torch.equal(load_targets(tmp_path / "t.safetensors").hidden, t.hidden)
    part = load_targets(tmp_path / "t.safetensors", rows=torch.tensor([5, 1, 2, 6]))
    assert part.logp.shape == (4, T - 1, K) and part.held.tolist() == [1, 2, 5, 6]
    got = part.rows(torch.tensor([6, 1]))  # rows of the whole file
    assert torch.equal(got.logp, t.logp[[6, 1]]) and torch.equal(got.hidden, t.hidden[[6, 1]])
    assert torch.equal(got.label, t.label[[6, 1]])
    with pytest.raises(ValueError, match=r"rows \[3\] are not among the 4 rows read"):
        part.rows(torch.tensor([3]))
    header = load_targets(tmp_path / "t.safetensors", rows=torch.empty(0, dtype=torch.int64))  # its key, no rows
    assert header.key == "key-1" and header.label is not None and header.logp.shape == (0, T - 1, K)
    with pytest.raises(CorruptArtifactError, match="holds 7 rows"):
        read_rows(tmp_path / "t.safetensors", [2, 7])
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) - 100])  # a truncated copy: refused from its header
    with pytest.raises(CorruptArtifactError, match="not a readable teacher-targets file"):
        load_targets(tmp_path / "cut.safetensors", rows=torch.empty(0, dtype=torch.int64))


def test_an_unfinished_file_is_never_renamed_into_place(tmp_path):
    t = _targets(False)
    path = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match="1 of 7 rows of t.safetensors were never written"):
        with TargetsWriter(path, n=N, seq_len=T, top_k=K, hidden_size=H, key="k", labels=False, fmt=FORMAT) as w:
            w.write(0, t.logp[:6], t.index[:6], t.rest[:6], t.hidden[:6])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with TargetsWriter(path, n=N, seq_len=T, top_k=K, hidden_size=H, key="k", labels=False, fmt=FORMAT):
            raise RuntimeError("the teacher pass failed")
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_cannot_be_sized_leaves_nothing(tmp_path, monkeypatch):
    import os

    def full(fd, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "ftruncate", full)
    with pytest.raises(OSError, match="No space left"):
        TargetsWriter(tmp_path / "t.safetensors", n=N, seq_len=T, top_k=K, hidden_size=H, key="k", labels=False,
                      fmt=FORMAT)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_ranks_rows_are_the_rows_their_steps_visit(world):
    cfg = GKDConfig(steps=5, batch=4, seed=3)
    n = cfg.steps * cfg.batch
    order = visit_order(cfg, n)
    local = cfg.batch // world
    for rank in range(world):
        visited = {int(order[(s * cfg.batch + j) % n]) for s in range(cfg.steps)
                   for j in range(rank * local, (rank + 1) * local)}
        assert set(train_rows(cfg, n, rank, world).tolist()) == visited and len(visited) == n // world
    assert sorted(sum((train_rows(cfg, n, r, world).tolist() for r in range(world)), [])) == list(range(n))
    assert sum((val_rows(5, r, world).tolist() for r in range(world)), []) == list(range(5))
