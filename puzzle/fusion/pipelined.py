"""A model's layers split over ``torchrun`` ranks, run as one pipeline: the sharded fusion's passes.

    part = RankModel("runs/x/child", range(0, 20), shard, dtype=torch.float32)   # this rank's layers only
    inputs = part.run(ids, chunk=len(ids), keep={5})      # the stream entering layer 5 (if it is ours)
    part.fused[5] = (Segment(5, 8), part.fuse(Segment(5, 8)))   # later passes run the fused block instead
    judge = Judge(heldout, shard, to_parent=None)
    judge.reference_pass(part)                            # the last rank keeps the log-probs, 2 sequences a chunk
    judge.quality(part, to_parent=False)                  # {kl, loss_delta, top1_agreement} on the last rank

Rank 0 embeds the ids; every rank runs its layers on the stream it receives and sends it to the
next (``send``/``recv``: gloo on CPU, NCCL on GPU); the last rank applies the final norm and the head.
Each chunk goes through the same modules in the same shapes as the runtime's whole forward
(:class:`puzzle.model.modeling.HeterogeneousModel`), so the log-probs equal
:func:`puzzle.fusion.evaluate.reference_logprobs`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import torch
from torch import nn

from block_library.distributed import Shard
from puzzle.fusion.fuse import fuse_ffn_state
from puzzle.fusion.memory import EVAL_CHUNK
from puzzle.fusion.runs import Segment, fused_blocks, fused_width
from puzzle.loading import Source, load_layers
from puzzle.model import PuzzleConfig
from puzzle.model.modeling import DecoderBlock
from puzzle.scoring.metrics import TokenSums, next_token_logprobs

_NO_CTX = {"cos": None, "sin": None, "mask": None, "cache": None}  # attention-free blocks read no context


class RankModel:
    """This rank's share of a model directory: its layers on its device, the embedding (first rank),
    the final norm and head (last rank); everything else stays on the meta device (0 bytes).
    ``fused`` maps a segment's first layer to (segment, fused block): the block replaces its members."""

    def __init__(self, source: str | Path | Source, layers: range, shard: Shard, *, dtype: torch.dtype) -> None:
        self.model = load_layers(source, list(layers), embed=shard.first, head=shard.last, dtype=dtype)
        self.config: PuzzleConfig = self.model.config
        self.layers, self.shard, self.dtype = layers, shard, dtype
        body = self.model.model
        parts = [body.layers[l] for l in layers] + ([body.embed_tokens] if shard.first else [])
        parts += [body.norm, self.model.lm_head] if shard.last else []
        for m in parts:
            m.to(shard.device)
        self.fused: dict[int, tuple[Segment, nn.Module]] = {}

    def blocks(self) -> list[tuple[int, nn.Module]]:
        """(first layer, block) in order: the rank's layers with each fused segment as one block."""
        out, l = [], self.layers.start
        while l < self.layers.stop:
            if l in self.fused:
                seg, block = self.fused[l]
                out.append((l, block))
                l = seg.stop
            else:
                out.append((l, self.model.model.layers[l]))
                l += 1
        return out

    @torch.no_grad()
    def run(self, ids: torch.Tensor, *, chunk: int, keep: Collection[int] = (),
            on_logprobs: Callable[[int, torch.Tensor], None] | None = None) -> dict[int, torch.Tensor]:
        """The rank's part of one pipelined forward pass over ids (N, T), ``chunk`` sequences at a time:
        the streams entering the layers in ``keep`` (N, T, H); on the last rank ``on_logprobs(k, (b, T-1, V))``
        for chunk k (float32, CPU), computed as the runtime's forward computes them."""
        shard, (N, T) = self.shard, ids.shape
        body, H = self.model.model, self.config.hidden_size
        kept: dict[int, list[torch.Tensor]] = {l: [] for l in keep}
        blocks = self.blocks()
        for k, c in enumerate(range(0, N, chunk)):
            x_ids = ids[c:c + chunk].to(shard.device)
            B = x_ids.shape[0]
            x = body.embed_tokens(x_ids) if shard.first else shard.recv((B, T, H), self.dtype)  # (B, T, H)
            pos = torch.arange(T, device=shard.device)[None].expand(B, T)
            cos, sin = body.rotary_emb(pos, x.dtype)  # as HeterogeneousModel.forward: (B, T, hd) each
            ctx = {"cos": cos, "sin": sin, "mask": None, "cache": None}
            for l, block in blocks:
                if l in kept:
                    kept[l].append(x)
                x = block(x, ctx)
            if not shard.last:
                shard.send(x)
            elif on_logprobs is not None:
                on_logprobs(k, next_token_logprobs(self.model.lm_head(body.norm(x))).cpu())
        return {l: v[0] if len(v) == 1 else torch.cat(v) for l, v in kept.items()}

    def fuse(self, seg: Segment) -> nn.Module:
        """The fused block of ``seg`` (its members are this rank's), as :func:`~puzzle.fusion.fuse.fuse_model`
        builds it."""
        state = fuse_ffn_state([self.model.model.layers[i].state_dict() for i in seg.layers], bias=self.config.mlp_bias)
        spec = {"attention": "no_op", "num_key_value_heads": None, "ffn": "swiglu",
                "intermediate_size": fused_width(self.config.blocks, seg)}
        with torch.device("meta"):
            block = DecoderBlock(self.config, spec, 0)
        block.load_state_dict(state, assign=True)
        return block.eval()

    def stream_at(self, runs: Sequence[Segment], inputs: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
        """The calibration stream entering ``layer`` of one of this rank's runs, from the run's cached input."""
        run = next(r for r in runs if r.start <= layer < r.stop)
        x = inputs[run.start]
        with torch.no_grad():
            for i in range(run.start, layer):
                x = self.model.model.layers[i](x, _NO_CTX)
        return x

    def state(self, fused: Sequence[Segment]) -> dict[str, torch.Tensor]:
        """The rank's tensors under the names of the model with every rank's ``fused`` segments fused
        (layers renumbered; a tied head is not stored)."""
        _, origin = fused_blocks(self.config.blocks, fused)
        index = {first: j for j, first in enumerate(origin)}
        out = {"model.embed_tokens.weight": self.model.model.embed_tokens.weight} if self.shard.first else {}
        for l, block in self.blocks():
            out.update({f"model.layers.{index[l]}.{k}": v for k, v in block.state_dict().items()})
        if self.shard.last:
            out["model.norm.weight"] = self.model.model.norm.weight
            if not self.config.tie_word_embeddings:
                out["lm_head.weight"] = self.model.lm_head.weight
        return {k: v.detach() for k, v in out.items()}


class Judge:
    """Held-out passes: the last rank keeps the reference log-probs (the unfused child's, the parent's)
    chunk by chunk and scores every later pass against them; the other ranks only forward."""

    def __init__(self, ids: torch.Tensor, shard: Shard, to_parent: list[torch.Tensor] | None) -> None:
        self.ids, self.shard, self.to_parent = ids, shard, to_parent
        self.reference: list[torch.Tensor] = []

    def labels(self, k: int) -> torch.Tensor:
        return self.ids[k * EVAL_CHUNK:(k + 1) * EVAL_CHUNK, 1:]  # (b, T-1)

    def reference_pass(self, part: RankModel) -> float | None:
        """Keep the unfused child's log-probs; return its KL to the parent (last rank, with a parent)."""
        sums = TokenSums()

        def got(k: int, logp: torch.Tensor) -> None:
            self.reference.append(logp)
            if self.to_parent is not None:
                sums.add(self.to_parent[k], logp, self.labels(k))

        part.run(self.ids, chunk=EVAL_CHUNK, on_logprobs=got)
        return sums.means()["kl"] if self.shard.last and self.to_parent is not None else None

    def quality(self, part: RankModel, *, to_parent: bool) -> dict[str, float] | None:
        """kl, loss_delta, top1_agreement against the unfused child (and kl_to_parent); None off the last rank."""
        sums, psums = TokenSums(), TokenSums()

        def got(k: int, logp: torch.Tensor) -> None:
            sums.add(self.reference[k], logp, self.labels(k))
            if to_parent and self.to_parent is not None:
                psums.add(self.to_parent[k], logp, self.labels(k))

        part.run(self.ids, chunk=EVAL_CHUNK, on_logprobs=got)
        if not self.shard.last:
            return None
        out = sums.means()
        if to_parent and self.to_parent is not None:
            out["kl_to_parent"] = psums.means()["kl"]
        return out
