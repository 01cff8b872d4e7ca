"""The parent, run layer by layer with teacher forcing: every variant sees the parent's activations.

For layer ``l`` with input ``x`` (B, T, H) the parent computes

    h = x + attn_l(input_layernorm(x))        attention variants learn  x -> h
    y = h + ffn_l(post_attention_layernorm(h)) FFN variants learn       h -> y

and ``y`` is the next layer's input. :func:`run_pass` streams batches through the layers this
process owns and calls ``visit(layer, x, h, y)`` at each; activations are never written to disk.
Under ``torchrun`` each rank owns a contiguous run of layers and hidden states are sent on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from block_library.distributed import Shard
from puzzle.model import PuzzleForCausalLM

Visit = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]], None]
"""``visit(layer, x, h, y, ctx)``: the layer's input, mid-layer and output streams (B, T, H) each."""


class Teacher:
    """The parent's embedding and the layers one process owns, frozen, on its device."""

    def __init__(self, model: PuzzleForCausalLM, shard: Shard, *, dtype: torch.dtype) -> None:
        """Take the shard's layers (and the embedding on rank 0) from ``model``; only those need to be
        loaded (see :func:`puzzle.loading.load_layers`), the rest may be on the meta device."""
        self.config = model.config
        self.shard, self.dtype = shard, dtype
        body = model.model
        self.embed = _on(body.embed_tokens, "the embedding", shard, dtype) if shard.first else None
        self.blocks: dict[int, nn.Module] = {l: _on(body.layers[l], f"layer {l}", shard, dtype) for l in shard.layers}
        self.rotary = body.rotary_emb
        frozen = list(self.blocks.values()) + ([self.embed] if self.embed is not None else [])
        for module in frozen:
            module.requires_grad_(False).eval()

    def context(self, B: int, T: int) -> dict[str, Any]:
        """What a block's forward reads besides x: RoPE tables for positions 0..T-1, causal mask."""
        pos = torch.arange(T, device=self.shard.device)[None].expand(B, T)
        cos, sin = self.rotary(pos, self.dtype)  # (B, T, hd) each
        return {"cos": cos, "sin": sin, "mask": None, "cache": None}

    @torch.no_grad()
    def layer(self, l: int, x: torch.Tensor, ctx: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The parent's mid-layer and output residual streams ``h, y`` (B, T, H) for input ``x``."""
        block = self.blocks[l]
        h = x + block.self_attn(block.input_layernorm(x), ctx) if block.spec["attention"] != "no_op" else x
        y = h + block.mlp(block.post_attention_layernorm(h)) if block.spec["ffn"] != "no_op" else h
        return h, y


def _on(module: nn.Module, what: str, shard: Shard, dtype: torch.dtype) -> nn.Module:
    """``module`` on the shard's device in ``dtype``; one left on the meta device (not loaded) is an error."""
    if any(p.is_meta for p in module.parameters()):
        raise ValueError(f"rank {shard.rank}: {what} of the parent was not loaded (it is on the meta device)")
    return module.to(shard.device, dtype)


def run_pass(teacher: Teacher, batches: Iterable[torch.Tensor | tuple[int, int]], visit: Visit,
             *, after_batch: Callable[[], None] | None = None) -> None:
    """Stream batches through this process's layers, calling ``visit(l, x, h, y, ctx)`` at each layer.

    Rank 0 passes token ids (B, T); other ranks pass the ``(B, T)`` shape they will receive.
    """
    shard, H = teacher.shard, teacher.config.hidden_size
    for batch in batches:
        if shard.first:
            ids = batch.to(shard.device)
            B, T = ids.shape
            with torch.no_grad():
                x = teacher.embed(ids)  # (B, T, H)
        else:
            B, T = batch
            x = shard.recv((B, T, H), teacher.dtype)
        ctx = teacher.context(B, T)
        for l in shard.layers:
            h, y = teacher.layer(l, x, ctx)
            visit(l, x, h, y, ctx)
            x = y
        if not shard.last:
            shard.send(x)
        if after_batch is not None:
            after_batch()


def batches_of(ids: torch.Tensor | None, n_rows: int, batch_size: int, seq_len: int, *, first: bool,
               start: int = 0) -> list[Any]:
    """Batches for :func:`run_pass`: row slices of ``ids`` on rank 0, their shapes elsewhere."""
    out = []
    for s in range(start, n_rows, batch_size):
        e = min(s + batch_size, n_rows)
        out.append(ids[s:e] if first else (e - s, seq_len))
    return out
