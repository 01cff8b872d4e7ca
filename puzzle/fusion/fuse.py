"""Exact fusion: a segment of attention-free SwiGLU blocks becomes one wide SwiGLU block.

Sequentially the segment computes ``x_{k+1} = x_k + FFN_k(w_k * n(x_k))`` with ``n`` the RMS
normalization and ``w_k`` block k's norm weight. The fused block computes, on the segment input
``x``, the parallel sum

    x + sum_k FFN_k(w_k * n(x))  =  x + D · (silu(G · n(x)) * (U · n(x)))

with G = [G_k diag(w_k)]_k and U = [U_k diag(w_k)]_k stacked by rows, D = [D_k]_k by columns:
each block's norm scale is folded into its gate and up rows, so one normalization with unit
weight remains. The fused block equals the parallel sum exactly (up to float rounding); the
fused model differs from the sequential one only by the parallel approximation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from puzzle.fusion.runs import Segment, fused_blocks
from puzzle.model import PuzzleForCausalLM
from puzzle.model.weights import model_from_state_dict

FFN_NAMES = ("gate_proj", "up_proj", "down_proj")


def fuse_ffn_state(parts: Sequence[dict[str, torch.Tensor]], *, bias: bool) -> dict[str, torch.Tensor]:
    """One wide block's weights from its members' (each: ``post_attention_layernorm.weight`` and
    ``mlp.{gate,up,down}_proj.{weight,bias}``); folding in float64, stored in the members' dtype.

    One projection at a time is in float64 (its members' copies and their concatenation), so the
    transient memory is about 2 x 8 bytes per parameter of one projection, not of the whole block."""
    dtype = parts[0]["mlp.gate_proj.weight"].dtype
    w = [p["post_attention_layernorm.weight"].double() for p in parts]  # (H,) each
    out = {
        "post_attention_layernorm.weight": torch.ones_like(parts[0]["post_attention_layernorm.weight"]),
        "mlp.gate_proj.weight": torch.cat([p["mlp.gate_proj.weight"].double() * wk for p, wk in zip(parts, w)]
                                          ).to(dtype),  # (M, H)
        "mlp.up_proj.weight": torch.cat([p["mlp.up_proj.weight"].double() * wk for p, wk in zip(parts, w)]
                                        ).to(dtype),  # (M, H)
        "mlp.down_proj.weight": torch.cat([p["mlp.down_proj.weight"].double() for p in parts], dim=1
                                          ).to(dtype),  # (H, M)
    }
    if bias:
        out["mlp.gate_proj.bias"] = torch.cat([p["mlp.gate_proj.bias"].double() for p in parts]).to(dtype)  # (M,)
        out["mlp.up_proj.bias"] = torch.cat([p["mlp.up_proj.bias"].double() for p in parts]).to(dtype)  # (M,)
        out["mlp.down_proj.bias"] = torch.stack([p["mlp.down_proj.bias"].double() for p in parts]
                                                ).sum(0).to(dtype)  # (H,)
    return {k: v.to(dtype) for k, v in out.items()}


def _layer_state(state: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def fuse_model(model: PuzzleForCausalLM, segments: Sequence[Segment]) -> PuzzleForCausalLM:
    """A new model with each segment of two or more layers fused into one block (``model`` is untouched).

    Raises :class:`~puzzle.errors.ConfigError` when a segment holds attention or a non-SwiGLU FFN.
    """
    config = model.config
    blocks, origin = fused_blocks(config.blocks, segments)
    spans = {s.start: s for s in segments}
    # Copies: the fused model shares no tensor with ``model``, so training it (GKD) never moves the source.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    new = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    if config.tie_word_embeddings:
        new.pop("lm_head.weight", None)
    for j, first in enumerate(origin):
        s = spans.get(first)
        if s is not None and len(s) > 1:
            layer = fuse_ffn_state([_layer_state(state, i) for i in s.layers], bias=config.mlp_bias)
        else:
            layer = _layer_state(state, first)
        new.update({f"model.layers.{j}.{k}": v for k, v in layer.items()})
    dtype = next(model.parameters()).dtype
    fused = model_from_state_dict(config.with_blocks(blocks), new, dtype=dtype)
    return fused.to(next(model.parameters()).device)


def parallel_reference(model: PuzzleForCausalLM, segment: Segment, x: torch.Tensor) -> torch.Tensor:
    """``x + sum_k FFN_k(norm_k(x))`` computed with the segment's own blocks: (B, T, H) -> (B, T, H)."""
    out = x
    for i in segment.layers:
        block = model.model.layers[i]
        out = out + block.mlp(block.post_attention_layernorm(x))
    return out


def sequential_reference(model: PuzzleForCausalLM, segment: Segment, x: torch.Tensor) -> torch.Tensor:
    """The segment's blocks one after the other: (B, T, H) -> (B, T, H)."""
    for i in segment.layers:
        x = model.model.layers[i](x, {"cos": None, "sin": None, "mask": None, "cache": None})
    return x
