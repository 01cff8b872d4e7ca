"""A child's sub-blocks against its parent's: which ones were replaced, and one sub-block applied to a stream.

Child-aware BLD (:mod:`puzzle.distill.child_bld`) trains the replaced sub-blocks and the child-stream refit
(:mod:`puzzle.distill.child_refit`) rebuilds the pruned FFNs among them; both walk a runtime ``DecoderBlock`` one
sub-block at a time::

    h = x + self_attn(input_layernorm(x), ctx)         attention (x itself where it is a no-op)
    y = h + mlp(post_attention_layernorm(h))           ffn
"""

from __future__ import annotations

from typing import Any

import torch

from puzzle.errors import ConfigError

SUBBLOCKS = {"attention": ("input_layernorm", "self_attn"), "ffn": ("post_attention_layernorm", "mlp")}
"""Each sub-block's modules in a runtime ``DecoderBlock``: its norm and its body."""


def replaced_subblocks(child: Any, parent: Any) -> list[tuple[int, str]]:
    """``(layer, "attention" | "ffn")`` of every sub-block of ``child`` that is neither the parent's own nor a no-op."""
    cb, pb = child.config.blocks, parent.config.blocks
    if len(cb) != len(pb):
        raise ConfigError(f"child-aware BLD needs the child's layers to be the parent's: {len(cb)} vs {len(pb)} "
                          "(run it before FFN fusion)")
    out = []
    for l, (c, p) in enumerate(zip(cb, pb)):
        for sub in ("attention", "ffn"):
            mine, theirs = getattr(c, sub), getattr(p, sub)
            if mine.kind != "no_op" and mine != theirs:
                out.append((l, sub))
    return out


def through(block: Any, sub: str, x: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
    """``x`` (b, T, H) after ``block``'s attention or FFN sub-block, residual included (``x`` itself where the
    sub-block is a no-op). Attention reads RoPE and the mask from ``ctx``; an FFN reads nothing."""
    if block.spec[sub] == "no_op":
        return x
    norm, body = SUBBLOCKS[sub]
    return x + getattr(block, body)(getattr(block, norm)(x), *((ctx,) if sub == "attention" else ()))
