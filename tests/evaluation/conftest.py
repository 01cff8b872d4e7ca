"""A tiny random runtime model for the evaluation tests."""

from __future__ import annotations

import pytest
import torch

from puzzle.model import PuzzleConfig, PuzzleForCausalLM

VOCAB = 50


def tiny_model(seed: int = 0) -> PuzzleForCausalLM:
    """2 layers, hidden 32, vocab 50; a wide init so the logits are far from uniform."""
    torch.manual_seed(seed)
    config = PuzzleConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=48, num_hidden_layers=2, max_position_embeddings=128,
                          initializer_range=0.5)
    return PuzzleForCausalLM(config).eval()


@pytest.fixture
def model() -> PuzzleForCausalLM:
    return tiny_model()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(1))  # 5 rows: an uneven last chunk
