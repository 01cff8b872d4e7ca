"""Fixtures of the data-layer tests."""

from __future__ import annotations

import pytest

from .fakes import CharTokenizer


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    """Token id = code point, EOS = 0."""
    return CharTokenizer()
