"""Packing with a one-token-per-character tokenizer, and once with the real SmolLM2 tokenizer."""

from __future__ import annotations

import logging

import pytest
import torch

from puzzle.data import Document, iter_documents, load_sequences, pack_sequences, packing
from puzzle.data.sources import stdlib_root
from puzzle.errors import DataError

from .fakes import CharTokenizer


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


DOCS = [Document("a", "abc"), Document("b", "de", ends=False), Document("b", "f"), Document("c", "ghij")]


def test_eos_after_each_document_and_remainder_dropped(char_tokenizer):
    rows = list(pack_sequences(DOCS, char_tokenizer, seq_len=4))
    # stream: a b c EOS | d e f EOS | g h i j | EOS (incomplete, dropped)
    assert [r.tolist() for r in rows] == [ids("abc") + [0], ids("def") + [0], ids("ghij")]
    assert all(r.shape == (4,) and r.dtype == torch.long for r in rows)


def test_explicit_eos_and_no_eos():
    rows = list(pack_sequences(DOCS, CharTokenizer(eos_token_id=0), seq_len=5, eos_token_id=7))
    assert [r.tolist() for r in rows] == [ids("abc") + [7, ord("d")], ids("ef") + [7] + ids("gh")]
    rows = list(pack_sequences(DOCS, CharTokenizer(eos_token_id=None), seq_len=5))
    assert [r.tolist() for r in rows] == [ids("abcde"), ids("fghij")]


def test_batching_does_not_change_the_stream(tmp_path, monkeypatch):
    docs = [Document(f"k{i}", f"document {i} " * (i % 5 + 1)) for i in range(300)]
    one_batch = torch.stack(list(pack_sequences(docs, CharTokenizer(), seq_len=16)))
    monkeypatch.setattr(packing, "FIRST_BATCH_CHARS", 7)
    monkeypatch.setattr(packing, "MAX_BATCH_CHARS", 50)
    tok = CharTokenizer()
    many_batches = torch.stack(list(pack_sequences(docs, tok, seq_len=16)))
    assert tok.calls > 10
    torch.testing.assert_close(many_batches, one_batch, rtol=0, atol=0)


def test_load_sequences_is_deterministic_and_stops_early():
    tok = CharTokenizer()
    first = load_sequences(["stdlib"], tok, seq_len=64, num_sequences=10)
    assert first.shape == (10, 64) and first.dtype == torch.long
    assert tok.chars_seen < 2 * packing.FIRST_BATCH_CHARS + 64 * 1024  # a few files, not the library
    again = load_sequences(None, CharTokenizer(), seq_len=64, num_sequences=10)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    source = (stdlib_root() / next(iter_documents(split="train")).key).read_text(encoding="utf-8")
    assert "".join(map(chr, first[0].tolist())) == source[:64]


def test_validation_sequences_differ_from_train(char_tokenizer):
    train = load_sequences(["stdlib"], char_tokenizer, seq_len=32, num_sequences=4)
    val = load_sequences(["stdlib"], char_tokenizer, seq_len=32, num_sequences=4, split="validation")
    assert val.shape == (4, 32) and not torch.equal(train, val)


def test_exhausted_corpus_warns_and_tiny_corpus_fails(tmp_path, caplog, char_tokenizer):
    path = tmp_path / "small.txt"
    path.write_text("x" * 99)  # 99 chars + EOS = 100 tokens
    with caplog.at_level(logging.WARNING):
        rows = load_sequences([str(path)], char_tokenizer, seq_len=10, num_sequences=50, split="all")
    assert rows.shape == (10, 10) and rows[-1, -1] == 0
    assert "ran out after 10 of 50 sequences" in caplog.text
    with pytest.raises(DataError, match=r"fewer than 101 tokens.*lower seq_len"):
        load_sequences([str(path)], char_tokenizer, seq_len=101, num_sequences=1, split="all")


@pytest.mark.parametrize("kwargs", [{"seq_len": 0}, {"seq_len": 4, "num_sequences": 0}])
def test_bad_sizes(char_tokenizer, kwargs):
    with pytest.raises(DataError, match="must be a positive integer"):
        load_sequences(["stdlib"], char_tokenizer, **{"num_sequences": 1, **kwargs})


@pytest.mark.slow
def test_real_tokenizer_on_stdlib(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows = load_sequences(["stdlib"], tok, seq_len=128, num_sequences=8)
    assert rows.shape == (8, 128) and rows.dtype == torch.long
    assert 0 <= int(rows.min()) and int(rows.max()) < len(tok)
    first_doc = next(iter_documents(split="train"))
    assert first_doc.text.startswith(tok.decode(rows[0]))  # byte-level BPE round-trips; no BOS added
    # EOS follows each document: the first one right after the first file's tokens.
    n = len(tok(first_doc.text, add_special_tokens=False)["input_ids"])
    flat = load_sequences(["stdlib"], tok, seq_len=n + 1, num_sequences=1)[0]
    assert int(flat[-1]) == tok.eos_token_id and tok.eos_token_id not in flat[:-1].tolist()
