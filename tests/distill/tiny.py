"""A tiny random parent, children carved from it, and a character tokenizer, for the GKD tests."""

from __future__ import annotations

import torch

from puzzle.distill import GKDConfig
from puzzle.fusion.derive import derive_model, without_attention
from puzzle.model import PuzzleConfig, PuzzleForCausalLM

VOCAB = 128
# 32-token sequences; validation on 4 of them; no checkpoints unless a test asks for them
SMALL = dict(seq_len=32, batch=4, steps=4, val_sequences=4, val_every=0, checkpoint_every=0)


def small(**changes) -> GKDConfig:
    return GKDConfig(**{**SMALL, **changes})


class CharTokenizer:
    """Token id = code point mod VOCAB; EOS = 0. Enough for ``load_sequences``."""

    eos_token_id = 0

    def __call__(self, texts, *, add_special_tokens=True, **kwargs):
        return {"input_ids": [[ord(c) % VOCAB for c in t] for t in texts]}


def tiny_parent(*, layers: int = 3, seed: int = 0) -> PuzzleForCausalLM:
    """fp32, eval: hidden 32, 4 heads / 2 KV heads, FFN 48, random norm weights."""
    torch.manual_seed(seed)
    config = PuzzleConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=48, num_hidden_layers=layers, initializer_range=0.15,
                          max_position_embeddings=64, eos_token_id=0)
    model = PuzzleForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def child_of(parent: PuzzleForCausalLM, *, no_attention: tuple[int, ...] = (1,)) -> PuzzleForCausalLM:
    """``parent`` with the attention of ``no_attention`` removed (same depth, copied weights)."""
    return derive_model(parent, without_attention(parent.config.blocks, no_attention))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
