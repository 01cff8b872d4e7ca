"""The finalists (:mod:`puzzle.search.finalists`) measured with every model's layers split over the ranks.

    shard = rank_shard(group)                                       # every rank, under torchrun
    ids = from_first(shard, lambda: finalist_ids(sources, tokenizer, skip=skip, sequences=SEQUENCES))
    finalists = measure_finalists_sharded(library, parent_dir, solutions, ids, shard=shard,
                                          path=run / "solve" / "parent-top1024.safetensors", parent_sha256=sha)
    finalists[0].solution                                           # the same list, best first, on every rank

In one process :func:`~puzzle.search.finalists.measure_finalists` holds the parent whole, each finalist whole and
the parent's log-probabilities over the whole vocabulary at every held-out position. Here no rank holds more than
its layers of one model (rank 0 also the embedding, the last rank the final norm and LM head) plus the parent's
targets:

1. the parent runs once, layer-sharded (:func:`puzzle.distill.teacher_sharded.sharded_targets`), and its top-k
   next-token log-probabilities and the log of its mass outside them are written to the solve stage's directory;
2. each finalist is assembled straight from the library's variant files, one rank's layers at a time
   (:meth:`block_library.Library.assemble_layers`), and the held-out tokens flow rank to rank
   (:class:`block_library.part.Part`); the last rank turns the final hidden states into the child's log-probs q
   and compares them with the cached targets.

With S the parent's top k tokens at a position, p its log-probs and y the next token, the last rank sums

    kl    = sum_{v in S} e^{p_v} (p_v - q_v) + e^{p_rest} (p_rest - q_rest)     (teacher_cache.cached_kl)
    top1  = [argmax_v q_v == the parent's most likely token]
    nll   = -q_y

``kl`` is KL(parent || child) with the vocabulary coarsened to S and one outcome "elsewhere": at most the exact
KL (the log-sum inequality), equal to it when k = V. The parent's own ``nll`` needs p_y, which the targets hold
only where y is among its top k: ``label_in_top_k`` says at what share of positions; ``parent_nll``,
``parent_ppl`` and ``loss_delta`` are reported only when that share is 1 (always when k = V), never estimated.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from block_library.distributed import Shard
from puzzle.distill.teacher_cache import TeacherTargets, cached_kl
from puzzle.search.finalists import Finalist

FINALIST_TOP_K = 1024
"""The parent's next tokens a multi-rank search keeps per held-out position (the vocabulary when smaller).

The finalists read 4 x 256 tokens, so the cache is small whatever k: 4 x 255 x 1024 x (4 + 4) bytes = 8.4 MB on
disk (12.5 MB once loaded, the ids as int64), beside the last hidden states (16 MB for a 70B parent). What k buys
is fidelity: on SmolLM2-135M over the finalists' tokens the parent's mass outside its top k is 10% at k = 64,
4.8% at 256, 1.6% at 1024; children with one or two layers removed measure a coarsened KL 12-16% below the exact
one at k = 64, 5-8% at 256, 1.3-3% at 1024. The gap is the mass outside the top k times the divergence within it,
so it shrinks with the child's error too. At 1024 it is small beside the differences between finalists (the
coarsened KL ranked those children, and the tiny test parent's finalists, as the exact KL does), at a cost the run
does not notice."""


def finalist_top_k(vocab_size: int) -> int:
    """The k of a multi-rank search's finalists: :data:`FINALIST_TOP_K`, or the vocabulary (then exact)."""
    return min(FINALIST_TOP_K, int(vocab_size))


def targets_name(top_k: int) -> str:
    """The file in the solve stage's directory that holds the parent's top-k targets."""
    return f"parent-top{top_k}.safetensors"


def rank_shard(group: Any) -> Shard:
    """This process's :class:`Shard` on its device (``cuda:<current>`` where CUDA is, the CPU otherwise), from a
    search's group (rank and world only; its process group is joined already)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Shard(rank=group.rank, world=group.world, device=device)


def from_first(shard: Shard, fn: Callable[[], Any]) -> Any:
    """``fn()`` computed on rank 0 and broadcast; an error it raises is raised on every rank (the others would
    otherwise wait for the broadcast forever)."""
    value, error = None, None
    if shard.first:
        try:
            value = fn()
        except Exception as e:  # re-raised below, on every rank
            error = e if _pickles(e) or shard.world == 1 else RuntimeError(f"{type(e).__name__}: {e}")
    value, error = shard.broadcast((value, error))
    if error is not None:
        raise error
    return value


def _pickles(obj: Any) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:
        return False
    return True


@dataclass
class CachedSums:
    """Running float64 sums of one child's metrics against cached targets (see the module docstring)."""

    kl: float = 0.0
    agree: float = 0.0
    nll: float = 0.0
    parent_nll: float = 0.0
    """Over the positions whose label is among the parent's top k (``covered``)."""
    covered: int = 0
    tokens: int = 0

    def add(self, q: torch.Tensor, labels: torch.Tensor, targets: TeacherTargets) -> None:
        """One chunk: the child's log-probs q (b, T-1, V), the next tokens (b, T-1) and the same b rows' targets."""
        labels = labels.to(q.device)
        logp, index = targets.logp.to(q.device), targets.index.to(q.device)  # (b, T-1, k) each
        self.kl += float(cached_kl(q, targets).double())
        self.agree += float((q.argmax(-1) == index[..., 0]).sum())
        self.nll -= float(q.gather(-1, labels.unsqueeze(-1)).double().sum())
        hit = index == labels.unsqueeze(-1)  # (b, T-1, k): at most one True per position
        self.parent_nll -= float(torch.where(hit, logp, 0.0).double().sum())
        self.covered += int(hit.any(-1).sum())
        self.tokens += labels.numel()

    def quality(self, top_k: int) -> dict[str, float]:
        """``kl``, ``top1_agreement``, ``nll``, ``ppl``, ``tokens``, ``top_k``, ``label_in_top_k`` and, when
        every label is in the targets, ``parent_nll``, ``parent_ppl`` and ``loss_delta``."""
        n = max(self.tokens, 1)
        out = {"kl": self.kl / n, "top1_agreement": self.agree / n, "nll": self.nll / n,
               "ppl": math.exp(self.nll / n), "tokens": self.tokens, "top_k": top_k,
               "label_in_top_k": self.covered / n}
        if self.covered == self.tokens:
            out.update(parent_nll=self.parent_nll / n, parent_ppl=math.exp(self.parent_nll / n),
                       loss_delta=(self.nll - self.parent_nll) / n)
        return out


@torch.no_grad()
def measure_sharded(library: Any, blocks: Sequence[Any], ids: torch.Tensor, targets: TeacherTargets | None, *,
                    shard: Shard, chunk: int = 2, progress: bool = False) -> dict[str, float]:
    """One library child's (``blocks``) metrics on ids (N, T) against the parent's ``targets`` on them (needed on
    the last rank only), its layers split over the ranks as :func:`~puzzle.distill.teacher_sharded.layer_ranges`
    splits them; the same dict on every rank."""
    from puzzle.distill.teacher_sharded import layer_ranges
    from block_library.part import Part

    layers = layer_ranges(library.parent_config.with_blocks(list(blocks)), shard.world)[shard.rank]
    part = Part(library.assemble_layers(blocks, layers, embed=shard.first, head=shard.last), layers, shard)
    sums, N = CachedSums(), ids.shape[0]
    for c, h in zip(range(0, N, chunk), part.chunks(ids, chunk, desc="finalist", progress=progress)):
        if shard.last:  # h (b, T, H): the last layer's output
            rows = slice(c, min(c + chunk, N))
            q = part.logprobs(h[:, :-1])  # (b, T-1, V) float32
            sums.add(q, ids[rows, 1:], targets.rows(rows))
            del q
    del part
    gc.collect()  # this child's layers are gone before the next one's are read
    return shard.broadcast(sums.quality(targets.top_k) if shard.last else None, src=shard.world - 1)


def measure_finalists_sharded(library: Any, parent_source: Any, solutions: Sequence[Any], ids: torch.Tensor, *,
                              shard: Shard, path: str | Path, parent_sha256: str, top_k: int, chunk: int = 2,
                              progress: bool = False) -> list[Finalist]:
    """:func:`~puzzle.search.finalists.measure_finalists` with the layers split over the ranks of ``shard``: the
    parent's top-``top_k`` targets on ids (N, T) computed once into ``path`` (reused when it holds them), then
    each solution (in MIP order; the same list on every rank) assembled and measured against them. Every rank
    calls it and returns the same finalists, best measured first (ties: MIP order)."""
    from puzzle.distill.teacher_sharded import sharded_targets
    from puzzle.schema import blocks_from_list

    none = torch.empty(0, dtype=torch.int64)  # only the last rank compares: the others read none of the rows
    targets = sharded_targets(parent_source, ids, top_k, path, shard=shard, parent_sha256=parent_sha256,
                              chunk=chunk, progress=progress, rows=None if shard.last else none)
    if not shard.last:
        targets = None
        gc.collect()
    out: list[Finalist] = []
    for rank, sol in enumerate(solutions):
        quality = measure_sharded(library, blocks_from_list(sol.block_configs()), ids, targets, shard=shard,
                                  chunk=chunk, progress=progress)
        out.append(Finalist(mip_rank=rank, solution=sol, quality=quality))
    return sorted(out, key=lambda f: (f.kl, f.mip_rank))
