"""Stage manifests: relative paths, recorded files checked on skip, outputs hashes chaining the stages."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest

import puzzle
from puzzle.errors import CorruptArtifactError
from puzzle.io import read_json_file
from puzzle.search.manifest import (MANIFEST, clean_temporaries, inspect_stage, matching_files, run_stage)


def _tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: (sha256, mtime_ns)."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


class Chain:
    """Three fake stages a -> b -> c; each key holds its inputs' outputs_sha256, as the pipeline's do."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.b_varies = True  # b writes its run count: a redone b produces different files

    def _write(self, name: str, d: Path, text: str) -> dict:
        self.calls.append(name)
        (d / "out").mkdir(exist_ok=True)
        (d / "out" / "data.txt").write_text(text)
        return {"data": d / "out" / "data.txt", "n": len(text)}

    def run(self, root: Path, **kw) -> dict:
        r = {}
        r["a"] = run_stage(root, "a", {"x": 1}, lambda d: self._write("a", d, "alpha" * 10), **kw)
        b_text = lambda: "beta" + (str(self.calls.count("b")) if self.b_varies else "")  # noqa: E731
        r["b"] = run_stage(root, "b", {"a": r["a"].outputs_sha256}, lambda d: self._write("b", d, b_text()), **kw)
        r["c"] = run_stage(root, "c", {"b": r["b"].outputs_sha256}, lambda d: self._write("c", d, "gamma"), **kw)
        return r


def test_a_copied_or_moved_root_is_skipped_and_reads_only_itself(tmp_path):
    chain = Chain()
    first = chain.run(tmp_path / "run")
    manifest = read_json_file(tmp_path / "run" / "b" / MANIFEST)
    assert manifest["outputs"]["data"] == "b/out/data.txt" and manifest["paths"] == ["data"]
    assert list(manifest["files"]) == ["b/out/data.txt"] and manifest["key"]["puzzle"] == puzzle.__version__
    before = _tree(tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    again = chain.run(tmp_path / "copy")
    assert chain.calls == ["a", "b", "c"] and all(r.skipped for r in again.values())
    assert again["b"].outputs["data"] == str(tmp_path / "copy" / "b" / "out" / "data.txt")
    assert {k: r.outputs_sha256 for k, r in again.items()} == {k: r.outputs_sha256 for k, r in first.items()}
    assert _tree(tmp_path / "run") == before  # the original is neither read for writing nor rewritten
    shutil.rmtree(tmp_path / "copy")
    os.rename(tmp_path / "run", tmp_path / "moved")
    moved = chain.run(tmp_path / "moved")
    assert all(r.skipped for r in moved.values()) and chain.calls == ["a", "b", "c"]
    assert Path(moved["c"].outputs["data"]).read_text() == "gamma" and "moved" in moved["c"].outputs["data"]


def test_a_deleted_file_redoes_its_stage_and_the_ones_after_it(tmp_path, caplog):
    chain = Chain()
    chain.run(tmp_path)
    (tmp_path / "b" / "out" / "data.txt").unlink()
    with caplog.at_level(logging.WARNING, logger="puzzle.search.manifest"):
        r = chain.run(tmp_path)
    assert chain.calls == ["a", "b", "c", "b", "c"]
    assert r["b"].reason == "b: b/out/data.txt is missing; redoing b" and r["b"].reason in caplog.text
    assert (r["a"].skipped, r["b"].skipped, r["c"].skipped) == (True, False, False)
    assert all(r.skipped for r in chain.run(tmp_path).values())
    # a redone stage invalidates the ones after it even when it writes the same bytes again
    chain.b_varies = False
    chain.run(tmp_path / "det")
    (tmp_path / "det" / "b" / "out" / "data.txt").unlink()
    calls = len(chain.calls)
    r = chain.run(tmp_path / "det")
    assert chain.calls[calls:] == ["b", "c"] and r["a"].skipped and not r["c"].skipped


def test_truncation_is_seen_by_size_and_same_size_corruption_only_by_verify(tmp_path):
    chain = Chain()
    chain.run(tmp_path)
    data = tmp_path / "a" / "out" / "data.txt"
    (tmp_path / "a" / "out" / "partial.ckpt").write_text("resumable work of the old a")
    data.write_text("alpha")  # truncated
    r = chain.run(tmp_path)
    assert r["a"].reason == "a: a/out/data.txt changed (size 5 != 50); redoing a" and chain.calls.count("a") == 2
    assert not (tmp_path / "a" / "out" / "partial.ckpt").exists()  # the stage's directory was cleared first
    data.write_text("ALPHA" * 10)  # same size, other bytes
    assert chain.run(tmp_path)["a"].skipped
    r = chain.run(tmp_path, verify=True)
    assert not r["a"].skipped and "a/out/data.txt changed (sha256" in r["a"].reason and data.read_text() == "alpha" * 10


def test_a_new_package_version_invalidates(tmp_path, monkeypatch):
    work = lambda d: (d / "f").write_text("x") and {}  # noqa: E731
    assert not run_stage(tmp_path, "s", {"x": 1}, work).skipped
    assert run_stage(tmp_path, "s", {"x": 1}, work).skipped
    monkeypatch.setattr(puzzle, "__version__", "99.0")
    r = run_stage(tmp_path, "s", {"x": 1}, work)
    assert not r.skipped and r.reason == "s: its key changed (puzzle)"
    with pytest.raises(ValueError, match="puzzle"):
        run_stage(tmp_path, "s", {"puzzle": 1}, work)


def _snapshot(root: Path) -> list[tuple[str, int, int]]:
    """Every path under root (directories too) with its size and mtime."""
    return [(p.relative_to(root).as_posix(), p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))]


def test_inspect_predicts_and_writes_nothing(tmp_path):
    def inspect(*args, **kw):
        before = _snapshot(tmp_path)
        check = inspect_stage(tmp_path, *args, **kw)
        assert _snapshot(tmp_path) == before
        return check

    work = lambda d: (d / "f.txt").write_text("hello") and {"f": str(d / "f.txt"), "k": 3}  # noqa: E731
    assert inspect("s", {"x": 1}).action == "run" and not (tmp_path / "s").exists()
    chain = Chain().run(tmp_path)
    done = run_stage(tmp_path, "s", {"x": 1}, work)
    check = inspect("s", {"x": 1}, verify=True)
    assert (check.action, check.outputs_sha256, check.outputs) == ("skip", done.outputs_sha256, done.outputs)
    check = inspect("s", {"x": 2})
    assert (check.action, check.reason, check.outputs) == ("run", "s: its key changed (x)", None)
    (tmp_path / "s" / "f.txt").write_text("HELLO")
    assert inspect("s", {"x": 1}).action == "skip"
    check = inspect("s", {"x": 1}, verify=True)
    assert check.action == "run" and "s/f.txt changed" in check.reason and check.outputs_sha256 is None
    (tmp_path / "b" / "out" / "data.txt").unlink()
    assert inspect("b", {"a": chain["a"].outputs_sha256}).reason == (
        "b: b/out/data.txt is missing; redoing b")


def test_record_patterns_split_a_directory_two_stages_write(tmp_path):
    lib = "library/lib"

    def library(d):
        (d / "lib" / "init").mkdir(parents=True)
        (d / "lib" / "init" / "L0.safetensors").write_bytes(b"i" * 8)
        (d / "lib" / "index.csv").write_text("init")
        (d / "lib" / ".tokenizer.json.x1.tmp").write_text("a temporary")
        return {"library": d / "lib"}

    def bld(d):
        (tmp_path / lib / "trained").mkdir(exist_ok=True)
        (tmp_path / lib / "trained" / "L0.safetensors").write_bytes(b"t" * 8)
        (tmp_path / lib / "index.csv").write_text("trained")  # rewrites a file the library stage wrote
        return {"library": tmp_path / lib}

    lib_record = [f"{lib}/**", f"!{lib}/trained/**", f"!{lib}/index.csv"]
    bld_record = [f"{lib}/trained/**", f"{lib}/index.csv"]
    a = run_stage(tmp_path, "library", {}, library, record=lib_record)
    b = run_stage(tmp_path, "bld", {"library": a.outputs_sha256}, bld, record=bld_record)
    assert list(read_json_file(tmp_path / "library" / MANIFEST)["files"]) == [f"{lib}/init/L0.safetensors"]
    assert list(read_json_file(tmp_path / "bld" / MANIFEST)["files"]) == [f"{lib}/index.csv",
                                                                          f"{lib}/trained/L0.safetensors"]
    assert b.outputs["library"] == str(tmp_path / lib)
    assert run_stage(tmp_path, "library", {}, library, record=lib_record).skipped  # bld's rewrite is not the library's
    (tmp_path / lib / "trained" / "L0.safetensors").write_bytes(b"t")
    r = run_stage(tmp_path, "bld", {"library": a.outputs_sha256}, bld, record=bld_record)
    assert not r.skipped and (tmp_path / lib / "init" / "L0.safetensors").is_file()  # upstream files are kept
    # stage code that trusts its other files and does not write a bad one again is refused, not recorded
    (tmp_path / lib / "trained" / "L0.safetensors").unlink()
    with pytest.raises(CorruptArtifactError, match="did not write it again"):
        run_stage(tmp_path, "bld", {"library": a.outputs_sha256}, lambda d: {}, record=bld_record)
    assert matching_files(tmp_path, ["library/lib"]) == [f"{lib}/index.csv", f"{lib}/init/L0.safetensors"]


def test_clean_temporaries_removes_only_leftovers(tmp_path):
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / ".lib.building" / "init").mkdir(parents=True)
    (tmp_path / "library" / ".lib.building" / "init" / "L0.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "score").mkdir()
    (tmp_path / "score" / ".x.abc.tmp").write_bytes(b"y" * 3)
    (tmp_path / "score" / ".model.k2j.tmp").mkdir()
    keep = ["score/x.tmp", "score/.hidden", "score/building", "score/.building", "score/notes.tmp.txt"]
    for k in keep:
        (tmp_path / k).write_text("user file")
    removed = clean_temporaries(tmp_path)
    assert sorted((p.relative_to(tmp_path).as_posix(), n) for p, n in removed) == [
        ("library/.lib.building", 10), ("score/.model.k2j.tmp", 0), ("score/.x.abc.tmp", 3)]
    assert all((tmp_path / k).is_file() for k in keep) and (tmp_path / "library").is_dir()
    (tmp_path / "score" / ".y.abc.tmp").write_text("being written by another run")
    assert clean_temporaries(tmp_path, min_age_s=3600) == [] and clean_temporaries(tmp_path) != []


def test_a_path_outside_the_root_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.txt"
    with pytest.raises(ValueError, match="outside the run directory"):
        run_stage(tmp_path / "run", "s", {}, lambda d: {"f": str(outside)})
    assert not (tmp_path / "run" / "s" / MANIFEST).exists()
    with pytest.raises(ValueError, match="relative"):
        run_stage(tmp_path / "run", "s", {}, lambda d: {}, record=["../x/**"])
    r = run_stage(tmp_path / "run", "s", {}, lambda d: {"label": "not/a/path", "here": d})
    assert r.outputs == {"label": "not/a/path", "here": str(tmp_path / "run" / "s")}
