"""Content-addressed parents: the parent's fingerprint covers its tensors' bytes, hashed once and cached
by file identity in the user cache (never next to the parent), re-read under ``verify``; a parent
re-trained in place with the same sizes, even with its mtime set back, redoes every stage."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from block_library.session import parent_fingerprint
from puzzle.loading import resolve_source
from puzzle.parents import hashes
from puzzle.search import STAGES, SearchConfig, planned_stages, resolve, search

FAST = dict(engine="transformers", budget="8xH100", speedup=1.2, bld_tokens=2048, bld_eval_sequences=1,
            score_sequences=1, score_seq_len=32, finalists=1, child_bld_tokens=0, fuse_sequences=1,
            fuse_distill_steps=0, gkd_steps=0, eval_sequences=1, measure_speed=False)
"""The smallest whole search on the tiny parent (about 20 s on 2 idle cores)."""


def _listing(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


def _retrain_in_place(parent: Path, *, keep_mtime: bool) -> None:
    """Rewrite the weights with other values of the same names, shapes and dtypes (so the same size), as a
    re-trained parent saved into the same directory; ``keep_mtime``: then set its times back."""
    path = parent / "model.safetensors"
    st = path.stat()
    time.sleep(0.05)  # the kernel stamps ctime at a coarse tick: leave the one of the original write
    state = {k: v + 0.01 for k, v in load_file(str(path)).items()}
    save_file(state, str(path), metadata={"format": "pt"})
    assert path.stat().st_size == st.st_size
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hashes, "_VERIFIED", {})
    monkeypatch.setattr(hashes, "FRESH_NS", 0)  # the copies here are seconds old
    return tmp_path / "cache" / "hashes"


@pytest.fixture
def parent(tiny_text_parent, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_text_parent, tmp_path / "parent"))


def _counting(monkeypatch) -> list[Path]:
    read: list[Path] = []
    real = hashes._hash_file
    monkeypatch.setattr(hashes, "_hash_file", lambda path, size: read.append(path) or real(path, size))
    return read


def test_hashed_once_cached_outside_the_parent_and_reread_under_verify(parent, cache, monkeypatch):
    read, before = _counting(monkeypatch), _listing(parent)
    source = resolve_source(str(parent))
    first = parent_fingerprint(source)
    assert [p.name for p in read] == ["model.safetensors"]
    assert _listing(parent) == before  # nothing written next to the parent
    [entry] = cache.glob("*.json")
    data = json.loads(entry.read_text())
    assert data["path"] == str((parent / "model.safetensors").resolve())
    assert data["size"] == (parent / "model.safetensors").stat().st_size and len(data["sha256"]) == 64
    assert parent_fingerprint(source) == first and len(read) == 1  # cached: no byte read
    assert parent_fingerprint(source, verify=True) == first and len(read) == 2  # verify reads again ...
    assert parent_fingerprint(source, verify=True) == first and len(read) == 2  # ... once per process


def test_same_size_weights_change_the_fingerprint_even_with_the_old_mtime(parent, cache, monkeypatch):
    source = resolve_source(str(parent))
    first = parent_fingerprint(source)
    _retrain_in_place(parent, keep_mtime=False)  # a new mtime
    second = parent_fingerprint(source)
    assert second != first
    _retrain_in_place(parent, keep_mtime=True)  # same size and mtime: the ctime the kernel set tells
    assert parent_fingerprint(source) not in (first, second)


def test_verify_ignores_a_cached_hash_that_no_longer_matches_the_bytes(parent, cache, monkeypatch):
    source = resolve_source(str(parent))
    first = parent_fingerprint(source)
    [entry] = cache.glob("*.json")
    data = json.loads(entry.read_text())
    entry.write_text(json.dumps({**data, "sha256": "0" * 64}))  # as a filesystem whose stat cannot tell
    assert parent_fingerprint(source) != first  # the cache is trusted without verify ...
    assert parent_fingerprint(source, verify=True) == first  # ... and not with it, which repairs it
    assert json.loads(entry.read_text())["sha256"] == data["sha256"]
    assert parent_fingerprint(source) == first


def test_an_unwritable_cache_costs_a_rehash_not_an_error(parent, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setattr(hashes, "FRESH_NS", 0)
    monkeypatch.setattr(hashes, "_WARNED", [])
    source = resolve_source(str(parent))
    assert parent_fingerprint(source) == parent_fingerprint(source)
    assert caplog.text.count("cannot cache file hashes") == 1


# ------------------------------------------------------------------------------ a whole search


@pytest.fixture(scope="module")
def finished(tiny_text_parent, tmp_path_factory):
    """A finished search on a copy of the tiny parent (which the tests below re-train in place)."""
    root = tmp_path_factory.mktemp("content")
    parent = Path(shutil.copytree(tiny_text_parent, root / "parent"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUZZLE_CACHE_DIR", str(root / "cache"))
        mp.setattr(hashes, "FRESH_NS", 0)  # the copy is seconds old: cache its hash all the same
        search(SearchConfig(model=str(parent), **FAST), root / "run", progress=False)
    return parent, root


@pytest.fixture
def in_finished(finished, monkeypatch):
    parent, root = finished
    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(root / "cache"))
    monkeypatch.setattr(hashes, "_VERIFIED", {})
    monkeypatch.setattr(hashes, "FRESH_NS", 0)  # cache the hash of weights re-trained a moment ago
    return parent, root / "run"


@pytest.mark.slow
def test_an_unchanged_parent_skips_every_stage_without_reading_its_weights(in_finished, monkeypatch):
    parent, run = in_finished
    monkeypatch.setattr(hashes, "_hash_file", lambda *a: pytest.fail("hashed a parent whose hash is cached"))
    plan = resolve(SearchConfig(model=str(parent), **FAST))
    assert [r["action"] for r in planned_stages(plan, run)] == ["skip"] * len(STAGES)


@pytest.mark.slow
def test_a_parent_retrained_in_place_redoes_every_stage(in_finished, monkeypatch):
    parent, run = in_finished
    plan = resolve(SearchConfig(model=str(parent), **FAST))
    [entry] = (Path(os.environ["PUZZLE_CACHE_DIR"]) / "hashes").glob("*.json")
    stale = json.loads(entry.read_text())["sha256"]
    _retrain_in_place(parent, keep_mtime=True)
    redo = {"stage": "library", "action": "run", "reason": "library: its key changed (parent)"}
    assert planned_stages(plan, run)[0] == redo  # same size and mtime: seen without verify (the ctime changed)
    entry.write_text(json.dumps({**json.loads(entry.read_text()), "sha256": stale}))  # a cache that cannot tell
    assert [r["action"] for r in planned_stages(plan, run)] == ["skip"] * len(STAGES)  # trusted without verify
    assert planned_stages(plan, run, verify=True)[0] == redo
    lines: list[str] = []
    search(plan, run, progress=False, echo=lines.append, verify=True)
    assert [line.split(": ")[1].split(" in ")[0] for line in lines] == ["done"] * len(STAGES), lines
    lines.clear()
    search(plan, run, progress=False, echo=lines.append)
    assert all(line.endswith("up to date, skipped") for line in lines), lines
