"""The parent's cached targets (:mod:`puzzle.distill.teacher_cache`) computed with its layers split over the ranks.

    targets = sharded_targets(parent_dir, ids, top_k, path, shard=shard, parent_sha256=sha)   # every rank calls it

Each rank reads only its contiguous layers of the parent (rank 0 also the embedding, the last rank the final
norm and LM head: :class:`block_library.part.Part`); hidden states flow rank to rank ``chunk`` sequences at a
time, and the last rank turns each chunk into its top-k log-probabilities, the rest and the last hidden state and
writes them into the file (:class:`~puzzle.distill.targets_file.TargetsWriter`: one chunk held at a time, the file
renamed into place once whole); the others wait for it. Every rank then reads the same file, or only the rows it
trains on (``rows``: 1/W of them under data parallelism): the targets of
:func:`~puzzle.distill.teacher_cache.compute_targets` on the whole parent (to float rounding), without any rank
holding more than its share of the parent. A file of the same key is reused; one process runs it alone.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch

from block_library.distributed import Shard
from puzzle.distill.targets_file import TargetsWriter
from puzzle.distill.teacher_cache import FORMAT, TeacherTargets, label_logprob, load_targets, outside_logprob, targets_key
from puzzle.errors import ConfigError, CorruptArtifactError

log = logging.getLogger(__name__)


def layer_ranges(config: Any, world: int) -> list[range]:
    """Each rank's contiguous layers of a model, balancing their parameters (as the sharded evaluation splits)."""
    from block_library.distributed import split_layers
    from puzzle.evaluation.memory import layer_params

    try:
        return split_layers([float(p) for p in layer_params(config)], world)
    except ValueError as e:
        raise ConfigError(f"cannot split {config.num_hidden_layers} layers over {world} processes: {e}") from None


def _holds(path: Path, key: str, labels: bool) -> bool:
    if not path.is_file():
        return False
    try:
        stored = load_targets(path, rows=torch.empty(0, dtype=torch.int64))  # the header alone, not 400 GiB of rows
        return stored.key == key and (stored.label is not None or not labels)
    except CorruptArtifactError as e:
        log.warning("%s; computing the teacher's targets again", e)
        return False


@torch.no_grad()
def sharded_targets(source: Any, ids: torch.Tensor, top_k: int, path: str | Path, *, shard: Shard,
                    parent_sha256: str, chunk: int = 2, dtype: torch.dtype = torch.float32,
                    hidden_dtype: torch.dtype = torch.bfloat16, labels: bool = False,
                    progress: bool = False, rows: torch.Tensor | None = None) -> TeacherTargets:
    """The parent's (a model directory ``source``) targets on ids (N, T), read from ``path`` when it holds these
    (same ``parent_sha256``, ids and k), else computed over the ranks of ``shard`` and written there; every rank
    calls it with the same ids and returns the same targets. ``labels``: with the parent's log-probability of each
    next token (``TeacherTargets.label``: the validation sequences' targets). ``rows``: this rank reads only these
    rows of the file (its share of the steps' batches), else every row."""
    from puzzle.loading import load_config, resolve_source
    from block_library.part import Part

    src = resolve_source(source)
    config = load_config(src)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= config.vocab_size:
        raise ConfigError(f"top_k must be an integer from 1 to the vocabulary size {config.vocab_size}, got {top_k!r}")
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ConfigError(f"teacher targets need token ids of shape (N >= 1, T >= 2), got {tuple(ids.shape)}")
    path = Path(path)
    key = targets_key(parent_sha256, ids, top_k)
    if shard.broadcast(_holds(path, key, labels) if shard.first else None):
        log.info("teacher targets reused from %s", path)
        return load_targets(path, rows)
    part = Part.load(src, layer_ranges(config, shard.world)[shard.rank], shard, dtype=dtype)
    error: Exception | None = None
    writer = None
    if shard.last:  # the file written a chunk at a time: no rank holds the whole cache
        try:
            writer = TargetsWriter(path, n=ids.shape[0], seq_len=ids.shape[1], top_k=top_k, key=key, labels=labels,
                                   hidden_size=config.hidden_size, fmt=FORMAT, hidden_dtype=hidden_dtype)
        except Exception as e:  # raised on every rank below: the others would wait for the file forever
            error = e
    for c, h in zip(range(0, ids.shape[0], chunk), part.chunks(ids, chunk, desc="teacher targets", progress=progress)):
        if shard.last and error is None:  # h (b, T, H): the last layer's output
            try:
                p = part.logprobs(h[:, :-1])  # (b, T-1, V) float32
                top, idx = p.topk(top_k, dim=-1)  # (b, T-1, k)
                writer.write(c, top, idx, outside_logprob(p, idx), h,
                             label_logprob(p, ids[c:c + chunk, 1:]) if labels else None)
                del p, top, idx
            except Exception as e:
                error = e
    del part
    gc.collect()
    if writer is not None:
        try:
            if error is None:
                writer.commit()
        except Exception as e:
            error = e
        finally:
            writer.abort()  # nothing left behind when the file was not committed
    error = shard.broadcast(error, src=shard.world - 1)
    if error is not None:
        raise error
    return load_targets(path, rows)
