"""A trained tiny library (3 layers, 4 attention x 8 FFN variants) and its scores, shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from block_library import build_library, train_library
from puzzle.scoring import ScoreConfig, score_library
from tests.block_library.conftest import tiny_config

TINY_SCORE = dict(seq_len=64, num_sequences=3, head_chunk=2)


@pytest.fixture(scope="session")
def tiny_library(tiny_text_parent, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("score_lib") / "lib"
    build_library(str(tiny_text_parent), out, tiny_config(tokens=512), progress=False)
    train_library(out, progress=False)
    return out


@pytest.fixture(scope="session")
def scored_additive(tiny_library, tmp_path_factory):
    return score_library(tiny_library, tmp_path_factory.mktemp("scores") / "additive",
                         ScoreConfig(**TINY_SCORE), progress=False)


@pytest.fixture(scope="session")
def scored_exact(tiny_library, tmp_path_factory):
    return score_library(tiny_library, tmp_path_factory.mktemp("scores") / "exact",
                         ScoreConfig(**TINY_SCORE, pairs="exact", variant_batch=3), progress=False)
