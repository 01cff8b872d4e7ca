"""The fusion tests run tiny models: one intra-op thread avoids waking a thread pool for each 32-wide matmul."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
