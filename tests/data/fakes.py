"""A tiny deterministic tokenizer for the data-layer tests."""

from __future__ import annotations


class CharTokenizer:
    """Token id = code point; EOS = 0. Records how many characters it was asked to encode."""

    def __init__(self, eos_token_id: int | None = 0) -> None:
        self.eos_token_id = eos_token_id
        self.chars_seen = 0
        self.calls = 0

    def __call__(self, texts, *, add_special_tokens=True, **kwargs):
        assert add_special_tokens is False, "packing must not let the tokenizer add BOS/EOS"
        assert isinstance(texts, list)
        self.calls += 1
        self.chars_seen += sum(map(len, texts))
        return {"input_ids": [[ord(c) for c in t] for t in texts]}
