"""Atomic writes and safetensors-only reading."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

import solvers.io
from puzzle.errors import CorruptArtifactError, ModelFilesError
from puzzle.io import atomic_directory, atomic_write_text, load_safetensors, safetensors_files, save_safetensors


def test_atomic_write_keeps_old_content_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def fail(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_the_mode_of_a_plain_new_file(tmp_path, umask):
    assert atomic_write_text is solvers.io.atomic_write_text  # puzzle's artifacts and the solvers' files alike
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
        atomic_write_text(tmp_path / "plain.txt", "y")  # replacing a file gives the new file's mode too
    finally:
        os.umask(old)
    for name in ("a.txt", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_puzzle_io_loads_no_solver_backend():
    code = "import sys, puzzle.io; print(sorted(m for m in ('pandas', 'pulp', 'ortools', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_atomic_directory_commits_only_on_success(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_directory(tmp_path / "d"):
            pass
    with atomic_directory(tmp_path / "d", overwrite=True) as tmp:
        (tmp / "g").write_text("2")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["g"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_sharded_save_round_trip(tmp_path):
    state = {f"w{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    names = save_safetensors(state, tmp_path, max_shard_bytes=2048)
    assert len(names) == 3 and (tmp_path / "model.safetensors.index.json").is_file()
    assert [p.name for p in safetensors_files(tmp_path)] == names
    loaded = load_safetensors(tmp_path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024


def test_index_listing_a_missing_shard(tmp_path):
    save_safetensors({"a": torch.ones(256), "b": torch.ones(256)}, tmp_path, max_shard_bytes=1024)
    next(tmp_path.glob("model-00002*")).unlink()
    with pytest.raises(ModelFilesError, match="missing files"):
        safetensors_files(tmp_path)


def test_garbage_weights_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CorruptArtifactError, match="cannot read"):
        load_safetensors(tmp_path)
