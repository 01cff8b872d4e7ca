"""Source resolution, the stdlib corpus, the train/validation split, laziness and errors."""

from __future__ import annotations

import builtins

import pytest

from puzzle.data import CorpusStats, corpus_stats, iter_documents, readers, split_of, stdlib_files
from puzzle.data.sources import stdlib_root
from puzzle.errors import DataError


@pytest.fixture(scope="module")
def stdlib_keys() -> dict[str, list[str]]:
    """Document keys of each split of the stdlib corpus (each a full pass, ~0.1 s)."""
    return {split: [d.key for d in iter_documents(split=split) if d.ends] for split in ("train", "validation", "all")}


def test_stdlib_file_list_is_sorted_and_excludes_caches():
    keys = [rel for rel, _ in stdlib_files()]
    assert keys == sorted(keys) and len(keys) > 500
    assert "json/decoder.py" in keys and "os.py" in keys
    banned = ("site-packages", "dist-packages", "__pycache__")
    assert not [k for k in keys if any(b in k.split("/") for b in banned)]
    assert not [k for k in keys if k.startswith("_sysconfigdata_") or k.startswith("config-")]
    # The lazy sorted walk finds exactly what a full recursive listing finds.
    root = stdlib_root()
    listed = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    listed = [k for k in listed if not any(b in k.split("/") for b in banned)
              and not k.startswith(("_sysconfigdata_", "config-"))]
    assert keys == listed


def test_stdlib_is_deterministic(stdlib_keys):
    again = [d.key for d in iter_documents(["stdlib"], split="all") if d.ends]
    assert again == stdlib_keys["all"]
    first = next(iter_documents(None, split="all"))
    assert (first.key, first.ends) == (stdlib_keys["all"][0], True)


def test_splits_partition_all(stdlib_keys):
    train, val, every = (set(stdlib_keys[s]) for s in ("train", "validation", "all"))
    assert not train & val
    assert train | val == every
    assert len(stdlib_keys["train"]) + len(stdlib_keys["validation"]) == len(stdlib_keys["all"])
    assert abs(len(val) / len(every) - 0.05) < 0.03
    assert all(split_of(k, 0.05) == "validation" for k in val)


def test_val_fraction_moves_documents_only_into_validation():
    small = {d.key for d in iter_documents(split="validation", val_fraction=0.05)}
    large = {d.key for d in iter_documents(split="validation", val_fraction=0.2)}
    assert small < large  # the hash threshold only grows the validation set


def test_chunks_of_a_file_share_its_split(tmp_path):
    for i in range(30):
        (tmp_path / f"f{i:02d}.txt").write_text("".join(f"{i} line {j}\n" for j in range(20)))
    split = {s: [d for d in iter_documents([str(tmp_path)], split=s, val_fraction=0.3, chunk_bytes=32)]
             for s in ("train", "validation")}
    for name, docs in split.items():
        assert docs and all(split_of(d.key, 0.3) == name for d in docs)
    train_keys, val_keys = ({d.key for d in docs} for docs in split.values())
    assert not train_keys & val_keys and len(train_keys | val_keys) == 30


def test_stream_is_lazy(monkeypatch):
    """The first stdlib document comes after listing one directory and opening one file."""
    opened, listed = [], []
    real_open, real_scandir = builtins.open, readers.os.scandir
    monkeypatch.setattr(readers, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k), raising=False)
    monkeypatch.setattr(readers.os, "scandir", lambda p: listed.append(p) or real_scandir(p))
    docs = iter_documents(["stdlib"], split="all")
    assert not opened and not listed  # nothing happens before the first next()
    next(docs)
    assert len(opened) == 1 and len(listed) == 1
    docs.close()


def test_missing_path_fails_before_reading(tmp_path):
    with pytest.raises(DataError, match=r"'.*nope\.txt' does not exist.*'stdlib'"):
        iter_documents(["stdlib", str(tmp_path / "nope.txt")])


def test_unknown_suffix_names_known_ones(tmp_path):
    path = tmp_path / "table.csvx"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match=r"unknown file type '\.csvx'; use one of .*\.jsonl.*\.parquet.*\.txt"):
        iter_documents([str(path)])


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "one.txt").write_text("text\n")
    with pytest.raises(DataError, match=r"no documents in the 'validation' split"):
        list(iter_documents([str(tmp_path)], split="validation", val_fraction=0.0))
    (tmp_path / "skipped.bin").write_bytes(b"\0")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"'.*empty' has no documents in the 'all' split"):
        list(iter_documents([str(empty)], split="all"))


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "test"}, "split must be one of"), ({"val_fraction": 1.5}, "val_fraction must be in"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(DataError, match=message):
        iter_documents(**kwargs)


def test_single_source_string_and_corpus_stats(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\n")
    (tmp_path / "b.md").write_text("x" * 40 + "\n" + "y" * 10)
    docs = list(iter_documents(str(tmp_path), split="all", chunk_bytes=16))
    # A line of 16+ characters is cut at a block end; text after the last newline joins the last piece.
    assert [d.text for d in docs] == ["héllo\n", "x" * 16, "x" * 16, "x" * 8 + "\n" + "y" * 10]
    assert [d.ends for d in docs] == [True, False, False, True]
    assert corpus_stats(str(tmp_path)) == CorpusStats(documents=2, pieces=2, characters=57, bytes=58)
