"""Each file format, read from files written in tmp_path, with exact expected content."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from puzzle.data import Document, iter_documents
from puzzle.data.readers import read_parquet, read_text
from puzzle.errors import DataError


def key(path) -> str:
    return os.path.normpath(path).replace(os.sep, "/")


@pytest.mark.parametrize("name", ["notes.txt", "README.md", "script.py", "guide.rst"])
def test_text_file_is_one_document(tmp_path, name):
    path = tmp_path / name
    path.write_text("first line\nsecond line é\n", encoding="utf-8")
    assert list(iter_documents([str(path)], split="all")) == [
        Document(key=key(path), text="first line\nsecond line é\n", ends=True)]


def test_big_text_file_is_read_in_chunks(tmp_path):
    lines = [f"line {i} " + "é" * (i % 7) + "\n" for i in range(200)]
    long_line = "ü" * 50 + "€" * 10  # no newline, multi-byte characters across chunk boundaries
    content = "".join(lines) + long_line
    path = tmp_path / "big.txt"
    path.write_text(content, encoding="utf-8")
    pieces = list(read_text(path, "k", chunk_bytes=32))  # every line is shorter than 32 bytes
    assert "".join(text for _, text, _ in pieces) == content
    assert len(pieces) > 50
    assert [ends for *_, ends in pieces] == [False] * (len(pieces) - 1) + [True]
    assert {k for k, *_ in pieces} == {"k"}
    # Cut after a newline, except inside the long line, which is cut at character boundaries.
    assert all(text.endswith("\n") or set(text) <= set("ü€") for _, text, _ in pieces)
    assert max(len(text) for _, text, _ in pieces) < 2 * 32
    # Through iter_documents: the same pieces, all in the split of the file's key.
    docs = list(iter_documents([str(path)], split="all", chunk_bytes=32))
    assert [d.text for d in docs] == [text for _, text, _ in pieces]


def test_invalid_utf8_is_replaced_with_a_warning(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1"))
    (doc,) = iter_documents([str(path)], split="all")
    assert doc.text == "caf\ufffd\n"
    assert "not valid UTF-8" in caplog.text and "latin1.txt" in caplog.text


def test_empty_text_file_gives_nothing(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert list(read_text(tmp_path / "empty.txt", "k")) == []


def test_directory_is_walked_recursively_in_sorted_order(tmp_path):
    root = tmp_path / "corpus"
    files = {"b.txt": "B\n", "a/z.md": "Z\n", "a.py": "A\n", "a/b/c.rst": "C\n", "a-b.txt": "D\n"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.txt").write_text("hidden\n")
    (root / ".hidden.txt").write_text("hidden\n")
    (root / "image.png").write_bytes(b"\x89PNG")  # unknown suffix inside a directory: skipped
    (root / "rows.jsonl").write_text(json.dumps({"text": "row"}) + "\n")
    docs = list(iter_documents([str(root)], split="all"))
    expected = ["a-b.txt", "a.py", "a/b/c.rst", "a/z.md", "b.txt"]  # == sorted(relative posix paths)
    assert [d.key for d in docs] == [key(root / rel) for rel in expected] + [key(root / "rows.jsonl") + ":1"]
    assert [d.text for d in docs] == [files[rel] for rel in expected] + ["row"]


def test_jsonl_one_document_per_line(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "alpha", "id": 1}, None, {"text": ""}, {"text": "gamma\nδ"}]
    path.write_text("".join("\n" if r is None else json.dumps(r) + "\n" for r in rows))
    assert list(iter_documents([str(path)], split="all")) == [
        Document(key=f"{key(path)}:1", text="alpha"), Document(key=f"{key(path)}:4", text="gamma\nδ")]


@pytest.mark.parametrize("line, message", [
    ('{"body": "x"}', r"line 2: no 'text' field \(found \['body'\]\)"),
    ('{"text": "x"', r"line 2: invalid JSON"),
    ('["text"]', r"line 2: no 'text' field"),
    ('{"text": 3}', r"line 2: 'text' must be a string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as info:
        list(iter_documents([str(path)], split="all"))
    assert "bad.jsonl" in str(info.value)


def test_parquet_rows_are_read_in_batches(tmp_path):
    path = tmp_path / "data.parquet"
    texts = ["zero", None, "two", "", "four", "five"]
    pq.write_table(pa.table({"id": list(range(6)), "text": texts}), path, row_group_size=4)
    expected = [(f"{key(path)}:{i}", t, True) for i, t in enumerate(texts) if t]
    assert list(read_parquet(path, key(path), batch_rows=2)) == expected
    assert [(d.key, d.text, d.ends) for d in iter_documents([str(path)], split="all")] == expected


def test_parquet_without_text_column_lists_columns(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), path)
    with pytest.raises(DataError, match=r"no 'text' column; available columns are \['id', 'body'\]"):
        list(iter_documents([str(path)], split="all"))


def test_parquet_text_column_must_hold_strings(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(DataError, match="column 'text' has type int64"):
        list(iter_documents([str(path)], split="all"))
