"""The parent run once: the residual stream entering every layer, and its next-token log-probs.

Replace-1-block scoring changes one layer; everything before it is the parent's. So the parent
runs once over the held-out ids (N, T) and keeps, for every layer l,

    inputs[l]  (N, T, H)   the residual stream entering layer l
    mids[l]    (N, T, H)   after layer l's attention sub-block (where an FFN variant starts)

and its log-probs (N, T-1, V) at every next-token position. A child with layer l replaced then
needs only its block on ``inputs[l]`` (or its FFN on ``mids[l]``), the parent's layers l+1..L-1,
the final norm and the LM head: :class:`ParentRunner`.

Every tensor goes through the same functions in the same shapes in the reference pass and in a
replacement (whole N sequences through the layers, ``head_chunk`` sequences through the head),
so replacing a layer's block by the parent's own reproduces the reference bit for bit (KL 0).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from puzzle.model import PuzzleForCausalLM
from puzzle.scoring.metrics import next_token_logprobs

log = logging.getLogger(__name__)


class ParentRunner:
    """The parent's embedding, layers, final norm and LM head, runnable from any layer (no grad)."""

    def __init__(self, model: PuzzleForCausalLM, *, head_chunk: int = 2) -> None:
        body = model.model
        self.config = model.config
        self.embed, self.layers, self.norm, self.head = body.embed_tokens, body.layers, body.norm, model.lm_head
        self.rotary = body.rotary_emb
        self.head_chunk = head_chunk
        model.eval().requires_grad_(False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def context(self, T: int, *, device: torch.device | str = "cpu") -> dict[str, Any]:
        """RoPE tables for positions 0..T-1 (batch 1, broadcast over any batch) and a causal mask."""
        pos = torch.arange(T, device=device)[None]  # (1, T)
        cos, sin = self.rotary(pos, torch.float32)  # (1, T, hd) each
        return {"cos": cos, "sin": sin, "mask": None, "cache": None}

    @torch.no_grad()
    def suffix(self, x: torch.Tensor, start: int, ctx: dict[str, Any], *, stop: int | None = None) -> torch.Tensor:
        """Parent layers ``start``..stop-1 (default: to the last) on the residual stream x (B, T, H) -> (B, T, H)."""
        for layer in self.layers[start:stop]:
            x = layer(x, ctx)
        return x

    @torch.no_grad()
    def logprob_chunks(self, x: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """Final norm + LM head on the last residual stream x (N, T, H), ``head_chunk`` sequences at a
        time: yields (rows, log-probs (n, T-1, V) float32); bounds memory to n * T * V floats."""
        for s in range(0, x.shape[0], self.head_chunk):
            rows = slice(s, min(s + self.head_chunk, x.shape[0]))
            yield rows, next_token_logprobs(self.head(self.norm(x[rows])))


@dataclass
class ParentCache:
    """The parent's activations on the held-out ids; see the module docstring."""

    ids: torch.Tensor
    """(N, T) int64 token ids."""
    inputs: list[torch.Tensor] | dict[int, torch.Tensor]
    """L tensors (N, T, H): the residual stream entering each layer (a sharded rank: its layers', by index)."""
    mids: list[torch.Tensor] | dict[int, torch.Tensor]
    """L tensors (N, T, H): the residual stream after each layer's attention sub-block (likewise)."""
    logprobs: torch.Tensor | None
    """(N, T-1, V) float32: the parent's log-probs of the next token (a sharded run: on the last rank only)."""

    @property
    def labels(self) -> torch.Tensor:
        return self.ids[:, 1:]  # (N, T-1)

    @property
    def nbytes(self) -> int:
        tensors = [*_values(self.inputs), *_values(self.mids)] + ([self.logprobs] if self.logprobs is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def _values(ts: list[torch.Tensor] | dict[int, torch.Tensor]) -> list[torch.Tensor]:
    return list(ts.values()) if isinstance(ts, dict) else list(ts)


def attention_half(block: torch.nn.Module, x: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
    """``x + attn(input_layernorm(x))`` of a runtime DecoderBlock (x itself for a no-op)."""
    if block.spec["attention"] == "no_op":
        return x
    return x + block.self_attn(block.input_layernorm(x), ctx)


@torch.no_grad()
def run_parent(runner: ParentRunner, ids: torch.Tensor) -> ParentCache:
    """One parent pass over ids (N, T): every layer's input and mid stream, and the log-probs."""
    N, T = ids.shape
    ctx = runner.context(T)
    x = runner.embed(ids)  # (N, T, H)
    inputs, mids = [], []
    for layer in runner.layers:
        inputs.append(x)
        h = attention_half(layer, x, ctx)
        mids.append(h)
        # The block applied exactly as the runtime does (DecoderBlock.forward), so a replacement's
        # own-parent row, which starts from `h`, reproduces the next input bit for bit.
        x = layer(x, ctx)
    logprobs = torch.empty(N, T - 1, runner.config.vocab_size)
    for rows, lp in runner.logprob_chunks(x):
        logprobs[rows] = lp
    cache = ParentCache(ids=ids, inputs=inputs, mids=mids, logprobs=logprobs)
    log.info("parent pass: %d x %d tokens, %d layers cached (%.0f MiB)", N, T, len(inputs), cache.nbytes / 2**20)
    return cache
