"""The GKD tests train tiny models: one intra-op thread avoids waking a thread pool for each 32-wide matmul."""

from __future__ import annotations

import pytest
import torch

from tests.distill.tiny import CharTokenizer, child_of, tiny_parent


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def parent():
    return tiny_parent()


@pytest.fixture
def child(parent):
    return child_of(parent)


@pytest.fixture
def tok():
    return CharTokenizer()

