"""Hub ids as parents, from a local huggingface_hub cache built here (``HF_HUB_OFFLINE=1``: no test reaches a hub).

The cache has huggingface_hub's layout: ``models--ORG--NAME/refs/main`` holds a commit, ``snapshots/COMMIT/`` the
files. A repository with the tiny parent's files resolves to its snapshot and is searched end to end; an empty cache
and a repository with pickled weights alone are one-line refusals; ``@revision`` pins another commit, which the
plan and the parent's fingerprint record.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from puzzle.errors import UnknownModelError, UnsafeCheckpointError
from puzzle.loading import load_config, resolve_source
from puzzle.parents.hub import snapshot_of

ROOT = Path(__file__).resolve().parents[2]
COMMIT, OTHER = "a" * 40, "b" * 40


def _repo(cache: Path, repo: str, files: Path | None, *, commit: str = COMMIT, ref: str = "main",
          only: tuple[str, ...] = ()) -> Path:
    """``repo`` in the hub cache ``cache`` at ``commit`` (``ref`` pointing at it), holding ``files``' files (``only``:
    just those names) or nothing; returns the snapshot directory."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / ref).write_text(commit)
    for f in sorted(files.iterdir()) if files is not None else []:
        if f.is_file() and (not only or f.name in only):
            shutil.copy2(f, snap / f.name)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from puzzle.parents import hub

    monkeypatch.setattr(hub, "_COMMITS", {})
    return cache


def test_a_cached_hub_id_resolves_to_its_snapshot_and_its_commit(hub_cache, tiny_llama_dir):
    snap = _repo(hub_cache, "some-org/some-model", tiny_llama_dir)
    src = resolve_source("some-org/some-model")
    assert (src.directory, src.kind) == (snap, "hf") and snapshot_of(src.directory) == ("some-org/some-model", COMMIT)
    assert load_config("some-org/some-model").num_hidden_layers == load_config(tiny_llama_dir).num_hidden_layers
    # a revision: another ref (a tag) pointing at another commit
    other = hub_cache / "models--some-org--some-model" / "snapshots" / OTHER
    shutil.copytree(snap, other)
    (hub_cache / "models--some-org--some-model" / "refs" / "v1").write_text(OTHER)
    assert snapshot_of(resolve_source("some-org/some-model@v1").directory)[1] == OTHER
    assert resolve_source(f"some-org/some-model@{OTHER}").directory == other
    # the fingerprint holds the commit: the same bytes from another commit are another parent
    from block_library.session import parent_fingerprint

    assert parent_fingerprint(resolve_source("some-org/some-model")) != parent_fingerprint(
        resolve_source("some-org/some-model@v1"))
    local = parent_fingerprint(resolve_source(tiny_llama_dir))  # the same files, not from the hub
    assert local != parent_fingerprint(resolve_source("some-org/some-model"))


def test_an_empty_cache_offline_is_one_line_naming_the_id_and_how_to_fetch_it(hub_cache):
    with pytest.raises(UnknownModelError) as e:
        resolve_source("some-org/missing-model")
    line = str(e.value)
    assert "\n" not in line and "some-org/missing-model" in line and "HF_HUB_OFFLINE" in line
    assert "`hf download some-org/missing-model`" in line
    with pytest.raises(UnknownModelError, match=r"hf download some-org/missing-model --revision v2"):
        resolve_source("some-org/missing-model@v2")


def test_pickled_weights_alone_are_refused(hub_cache, tiny_llama_dir):
    snap = _repo(hub_cache, "some-org/pickled", tiny_llama_dir, only=("config.json",))
    (snap / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(UnsafeCheckpointError, match=r"some-org/pickled has no safetensors weights \(only "
                                                    r"pytorch_model.bin\): puzzle never loads pickled weights"):
        resolve_source("some-org/pickled")
    # the plan reads the config alone: it plans without weights
    assert resolve_source("some-org/pickled", config_only=True).directory == snap


def test_not_a_hub_id():
    from puzzle.parents.hub import is_hub_id

    assert is_hub_id("meta-llama/Llama-3.1-8B") and is_hub_id("org/name@v1.0") and is_hub_id("org/name@" + COMMIT)
    assert not any(is_hub_id(t) for t in ("smollm2-135m", "llama-3.1-70b", "./org/name", "/abs/dir", "a/b/c"))


def _cli(*argv: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PUZZLE_CACHE_DIR": str(cwd / "pc")}
    return subprocess.run([sys.executable, "-m", "puzzle.cli.main", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow  # a whole search in a subprocess (about 30 s on 2 idle cores)
def test_search_plan_and_refusals_from_the_command_line(tmp_path, tiny_text_parent):
    from tests.search.test_run_lock import FAST

    cache = tmp_path / "hub"
    _repo(cache, "some-org/some-model", tiny_text_parent)
    # plan: the config alone is enough (the weights are not read)
    config_only = tmp_path / "hub2"
    _repo(config_only, "some-org/config-only", tiny_text_parent, only=("config.json",))
    plan = _cli("plan", "--model", "some-org/config-only", "--budget", "8xH100", "--engine", "transformers",
                cache=config_only, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-2000:]
    # the search: the quick search's stages, end to end, from the cached snapshot
    out = tmp_path / "run"
    done = _cli("search", "--model", "some-org/some-model", "--out", str(out), *FAST, cache=cache, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    import json

    parent = json.loads((out / "plan.json").read_text())["parent"]
    assert (parent["model"], parent["commit"]) == ("some-org/some-model", COMMIT)
    assert (out / "export" / "model" / "config.json").is_file()
    # an empty cache: one line, exit 2, nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = _cli("search", "--model", "some-org/some-model", "--out", str(tmp_path / "run2"), *FAST, cache=empty,
                   cwd=tmp_path)
    assert refused.returncode == 2 and not (tmp_path / "run2").exists()
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "some-org/some-model is not in the local hub cache" in lines[0], refused.stderr
