"""Tiny random heterogeneous models with attention-free SwiGLU runs, for the fusion tests."""

from __future__ import annotations

from typing import Any

import torch

from puzzle.model import PuzzleConfig, PuzzleForCausalLM

H, HEADS, KV, VOCAB = 32, 4, 2, 64


def gqa(width: int = 48) -> dict[str, Any]:
    return {"attention": {"kind": "gqa", "num_key_value_heads": KV}, "ffn": {"kind": "swiglu", "intermediate_size": width}}


def free(width: int = 48) -> dict[str, Any]:
    """An attention-free SwiGLU block (fusable)."""
    return {"attention": {"kind": "no_op"}, "ffn": {"kind": "swiglu", "intermediate_size": width}}


# layers 1-3 and 5-6 are attention-free SwiGLU runs, with different widths
BLOCKS = [gqa(48), free(48), free(64), free(32), gqa(48), free(40), free(24)]


def tiny_model(blocks: list[dict[str, Any]] | None = None, *, seed: int = 0, init: float = 0.15,
               **overrides: Any) -> PuzzleForCausalLM:
    """fp32, eval; every norm weight random (1 + 0.3 N(0, 1)), every bias (if any) random."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV,
                  intermediate_size=48, block_configs=blocks or BLOCKS, initializer_range=init,
                  max_position_embeddings=64)
    torch.manual_seed(seed)
    model = PuzzleForCausalLM(PuzzleConfig(**{**kwargs, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def block_ctx(model: PuzzleForCausalLM, ids: torch.Tensor) -> dict[str, Any]:
    """The ctx a forward pass without cache gives each block, for ``ids`` (B, T)."""
    B, T = ids.shape
    pos = torch.arange(T)[None].expand(B, T)
    cos, sin = model.model.rotary_emb(pos, torch.float32)
    return {"cos": cos, "sin": sin, "mask": None, "cache": None}


def ids_for(seed: int = 1, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))
