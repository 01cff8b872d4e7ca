"""Held-out quality of a child against its parent, both split by layers over the ranks of ``torchrun``.

    torchrun --nproc-per-node 8 my_eval.py     # each rank calls:
    q = evaluate_sharded(child_dir, parent_dir, tokenizer, sources=["stdlib"], seq_len=256, num_sequences=8)

Rank r reads from disk only its contiguous layers of one model at a time (rank 0 also the
embedding, the last rank also the final norm and LM head), and hidden states flow rank to rank,
``chunk`` sequences at a time::

    rank 0: ids -> embed -> layers[0:a] ──send──> rank 1: layers[a:b] ──send──> ... last rank:
            layers[..n] -> norm -> final hidden states (b, T, H)

First the parent runs over every chunk: the last rank keeps its final hidden states (N, T, H, a
few MB) and its LM head; the parent's layers are then dropped. Then the child runs, and for each
chunk the last rank turns both final hidden states into log-probabilities ``logit_positions``
next-token positions at a time (the parent's, then the child's), adds them to
:class:`~puzzle.scoring.metrics.TokenSums` and drops them: the sums of
:func:`~puzzle.evaluation.quality.evaluate_quality`, hence its metrics (to float rounding). A
rank never holds both models' layers. The result is broadcast, so every rank returns it. With
one process (no ``torchrun``) it runs alone. Memory per rank in closed form:
:mod:`puzzle.evaluation.memory`.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from block_library.distributed import Shard, init_shard, split_layers
from block_library.part import Part
from puzzle.data.packing import load_sequences
from puzzle.errors import ConfigError, DataError, PuzzleError
from puzzle.evaluation.memory import layer_params
from puzzle.evaluation.quality import add_chunk, check_vocabularies, quality_from_sums
from puzzle.loading import Source, load_config, resolve_source
from puzzle.scoring.metrics import TokenSums

log = logging.getLogger(__name__)


def _logprobs(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """(n, H) final-normed hidden states -> (n, V) float32 log-probs."""
    return F.log_softmax(head(h).float(), dim=-1)


def _score_chunk(sums: TokenSums, labels: torch.Tensor, head: nn.Module, h: torch.Tensor,
                 parent_head: nn.Module | None, parent_h: torch.Tensor | None, *, positions: int) -> None:
    """Add a chunk's metrics, ``positions`` next-token positions at a time: labels (b, T-1), final
    hidden states (b, T, H) of the child and of the parent (None: the child alone; ``h`` itself: the
    child against itself, KL exactly 0). Per position the same numbers as the whole chunk's log-probs give."""
    ys = labels.reshape(-1)  # (b*(T-1),)
    hc = h[:, :-1].reshape(-1, h.shape[-1])  # (b*(T-1), H): positions that have a next token
    hp = None if parent_h is None else parent_h[:, :-1].reshape(-1, parent_h.shape[-1])
    for s in range(0, ys.numel(), positions):
        e = min(s + positions, ys.numel())
        q = _logprobs(head, hc[s:e])[None]  # (1, n, V)
        p = None if hp is None else q if parent_h is h else _logprobs(parent_head, hp[s:e])[None]  # (1, n, V)
        add_chunk(sums, q, ys[None, s:e], p)
        del p, q


def _ranges(config: Any, world: int) -> list[range]:
    """Each rank's contiguous layers of one model, balancing their parameters."""
    try:
        return split_layers([float(p) for p in layer_params(config)], world)
    except ValueError as e:
        raise ConfigError(f"cannot split the evaluation over {world} processes: {e}") from None


def _sequences(shard: Shard, tokenizer: Any, sources: Any, seq_len: int, num_sequences: int) -> torch.Tensor:
    """Rank 0 reads the held-out ids (N, T); every rank gets them (or rank 0's error)."""
    payload: torch.Tensor | PuzzleError | None = None
    if shard.first:
        try:
            payload = load_sequences(sources, tokenizer, seq_len=seq_len, num_sequences=num_sequences,
                                     split="validation")
        except PuzzleError as e:  # raised on every rank, not only here: the others would wait forever
            payload = e
    payload = shard.broadcast(payload)
    if isinstance(payload, PuzzleError):
        raise payload
    return payload


def _same_directory(a: Source, b: Source) -> bool:
    return a.directory.resolve() == b.directory.resolve()


@torch.no_grad()
def evaluate_sharded(child_dir: str | os.PathLike[str], parent_dir: str | os.PathLike[str] | None, tokenizer: Any, *,
                     sources: Sequence[str | os.PathLike[str]] | str = ("stdlib",), seq_len: int = 256,
                     num_sequences: int = 8, chunk: int = 2, dtype: torch.dtype = torch.float32,
                     logit_positions: int = 256, device: str = "auto", progress: bool = False) -> dict[str, float]:
    """The metrics of :func:`~puzzle.evaluation.quality.evaluate_quality` on the validation split of
    ``sources`` (``nll``, ``ppl``, ``tokens``; with a parent ``kl``, ``top1_agreement``,
    ``loss_delta``, ``parent_nll``, ``parent_ppl``), computed with the layers split over the
    ``torchrun`` ranks; the same dict on every rank.

    ``child_dir`` / ``parent_dir``: model directories (runtime, HF or DeciLM); ``parent_dir=None``
    evaluates the child alone, and the child's own directory as parent gives a KL of exactly 0.
    ``tokenizer`` is used on rank 0 only. ``chunk`` sequences go through the layers at a time;
    log-probabilities are computed for ``logit_positions`` next-token positions at a time (the
    parent's, then the child's), so the last rank holds 5 x ``logit_positions`` x V floats at most.
    The parent runs first, then the child: a rank holds one model's layers at a time.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2 (next-token positions), got {seq_len}")
    child_src = resolve_source(child_dir)
    parent_src = None if parent_dir is None else resolve_source(parent_dir)
    same = parent_src is not None and _same_directory(parent_src, child_src)
    child_cfg = load_config(child_src)
    parent_cfg = None if parent_src is None else load_config(parent_src)
    if parent_cfg is not None:
        check_vocabularies(child_cfg, parent_cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    child_ranges = _ranges(child_cfg, world)
    parent_ranges = _ranges(parent_cfg, world) if parent_cfg is not None and not same else None
    shard = init_shard([1.0] * world, device=device)  # joins the group; each model's layers come from _ranges
    ids = _sequences(shard, tokenizer, sources, seq_len, num_sequences)  # (N, T)
    keep = shard.device if shard.device.type == "cpu" else torch.device("cpu")  # where the parent's states wait

    # Phase 1, the parent: the last rank keeps its final hidden states (N, T, H) and its LM head.
    parent_h: list[torch.Tensor] = []
    parent_head = None
    if parent_ranges is not None:
        parent = Part.load(parent_src, parent_ranges[shard.rank], shard, dtype=dtype)
        log.info("rank %d: parent layers %s", shard.rank, list(parent.layers))
        for h in parent.chunks(ids, chunk, desc="held-out quality (parent)", progress=progress):
            if shard.last:
                parent_h.append(parent.model.model.norm(h).to(keep))
        parent_head = parent.model.lm_head if shard.last else None
        del parent
        gc.collect()  # the parent's layers are gone before the child's are read

    # Phase 2, the child, scored chunk by chunk against the parent's stored states.
    child = Part.load(child_src, child_ranges[shard.rank], shard, dtype=dtype)
    log.info("rank %d: child layers %s", shard.rank, list(child.layers))
    if same:
        parent_head = child.model.lm_head
    sums = TokenSums()
    for i, h in enumerate(child.chunks(ids, chunk, desc="held-out quality (child)", progress=progress)):
        if shard.last:
            h = child.model.model.norm(h)
            x = ids[i * chunk:(i + 1) * chunk]
            hp = h if same else parent_h[i].to(shard.device) if parent_h else None
            _score_chunk(sums, x[:, 1:].to(shard.device), child.model.lm_head, h, parent_head, hp,
                         positions=logit_positions)
    out = quality_from_sums(sums, parent=parent_src is not None) if shard.last else None
    return shard.broadcast(out, src=shard.world - 1)
