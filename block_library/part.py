"""One rank's share of a model whose decoder layers are split over the ranks, and the stream between them (beside
:mod:`block_library.distributed`, whose :class:`Shard` carries it).

    part = Part.load(source, range(0, 15), shard)                # reads its layers (+ embedding / head at the ends)
    part = Part(library.assemble_layers(blocks, r, embed=..., head=...), r, shard)   # or built from any partial model
    for h in part.chunks(ids, chunk=2):    # (b, T, H) on the last rank: the last layer's output, before the norm
        ...

Rank 0 embeds the ids and runs its layers; every other rank receives the hidden states from the rank before,
runs its layers and sends them on (``Shard.send`` / ``Shard.recv``: NCCL on GPU, gloo on CPU). The last rank
returns the final hidden states. A rank runs ahead of the next by as many chunks as the transport buffers,
so the ranks work on consecutive chunks at once (a pipeline). With one rank it is the whole model's forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from block_library.distributed import Shard


class Part:
    """A model's layers ``layers`` on this rank (other parameters on the meta device), the embedding on the first
    rank and the final norm and LM head on the last, on ``shard.device``."""

    def __init__(self, model: Any, layers: Sequence[int], shard: Shard, *, dtype: torch.dtype = torch.float32) -> None:
        self.model, self.shard, self.dtype = model, shard, dtype
        self.layers = range(layers[0], layers[-1] + 1) if len(layers) else range(0)  # contiguous
        body = model.model
        modules = [body.layers[l] for l in self.layers] + [body.rotary_emb]
        modules += [body.embed_tokens] if shard.first else []
        modules += [body.norm, model.lm_head] if shard.last else []
        for m in modules:
            m.to(shard.device)

    @classmethod
    def load(cls, source: Any, layers: Sequence[int], shard: Shard, *, dtype: torch.dtype = torch.float32) -> Part:
        """This rank's layers of a stored model, read from disk one tensor at a time."""
        from puzzle.loading import load_layers

        return cls(load_layers(source, list(layers), embed=shard.first, head=shard.last, dtype=dtype), layers, shard,
                   dtype=dtype)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def context(self, b: int, T: int) -> dict[str, Any]:
        """The rotary tables of ``T`` positions and a causal mask, as the whole model runs its layers."""
        pos = torch.arange(T, device=self.shard.device)[None].expand(b, T)
        cos, sin = self.model.model.rotary_emb(pos, self.dtype)  # (b, T, hd) each
        return {"cos": cos, "sin": sin, "mask": None, "cache": None}

    def receive(self, ids: torch.Tensor | None, b: int, T: int) -> torch.Tensor:
        """The stream entering this rank's first layer: the embedded ids (b, T) on rank 0, received elsewhere."""
        if self.shard.first:
            return self.model.model.embed_tokens(ids.to(self.shard.device))  # (b, T, H)
        return self.shard.recv((b, T, self.hidden_size), self.dtype)

    @torch.no_grad()
    def run(self, ids: torch.Tensor | None, b: int, T: int) -> torch.Tensor | None:
        """One chunk through this rank's layers: token ids (b, T) on rank 0, received hidden states elsewhere.
        The last rank returns the last layer's output (b, T, H), before the final norm; the others send it on."""
        x = self.receive(ids, b, T)
        ctx = self.context(b, T)
        for l in self.layers:
            x = self.model.model.layers[l](x, ctx)
        if not self.shard.last:
            self.shard.send(x)
            return None
        return x

    def chunks(self, ids: torch.Tensor, chunk: int, *, desc: str = "", progress: bool = False
               ) -> Iterator[torch.Tensor | None]:
        """:meth:`run` over the rows of ``ids`` (N, T), ``chunk`` at a time, yielding its results (None but on the
        last rank). Every rank needs ``ids``' shape; only rank 0 reads its values."""
        N, T = ids.shape
        for c in tqdm(range(0, N, chunk), desc=desc, unit="chunk", disable=not (progress and self.shard.last)):
            yield self.run(ids[c:c + chunk], min(chunk, N - c), T)

    @torch.no_grad()
    def logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """(n, H) last-layer outputs (before the norm) -> (n, V) float32 next-token log-probs (the last rank)."""
        body = self.model.model
        return torch.log_softmax(self.model.lm_head(body.norm(h)).float(), dim=-1)
