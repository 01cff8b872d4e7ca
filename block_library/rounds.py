"""Rounds: when a rank's variants do not fit its memory at once, build or train them in groups.

    BLD round 1/3: [L000.attention.gqa:1 ... L010.ffn.linear]     each round replays the same
    BLD round 2/3: [L011.attention.gqa:1 ... L021.ffn.linear]     teacher passes (same batches,
    BLD round 3/3: [L022.attention.gqa:1 ... L031.ffn.linear]     same LR schedule)

A rank's budget for variants is ``max_memory_bytes - fixed_bytes``: what its process holds in
every round (teacher layers, embedding on rank 0, activations, baseline) is paid once. Variants are
packed greedily in layer order; every rank runs the same number of rounds (a rank with fewer runs
empty ones) because a teacher pass moves the hidden state through every rank. Each variant has its
own AdamW state, gradient clip and validation sums, so rounds change memory, never results.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from block_library.memory import INIT_BYTES_PER_PARAM, TRAIN_BYTES_PER_PARAM
from puzzle.errors import ConfigError, ResourceError

if TYPE_CHECKING:
    from block_library.session import Session

BUILD_BYTES_PER_PARAM = INIT_BYTES_PER_PARAM
"""Build state per variant parameter: the fp32 weights being initialized and validated."""
GiB = 1024**3
_UNITS = {"": 2**30, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def format_bytes(n: float) -> str:
    """``12.50 GiB``, or MiB below a tenth of a GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def parse_size(text: str | float, *, flag: str = "--max-memory-per-rank") -> int:
    """Bytes in ``80GB``, ``6GiB``, ``512MiB``, ``1.5TB``; a bare number (``6``, or a YAML 6) is GiB."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = f"{text}GiB"
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and _UNITS.get(m.group(2).lower())
    if not unit or float(m.group(1)) <= 0:
        raise ConfigError(f"{flag}: cannot read {text!r} as a memory size; write e.g. 80GB, 6GiB or 512MiB")
    return int(float(m.group(1)) * unit)


def plan_rounds(items: Sequence[tuple[str, int]], budget_bytes: float | None, *,
                bytes_per_param: int = TRAIN_BYTES_PER_PARAM) -> list[list[str]]:
    """Pack ``(variant key, params)`` items, in order, into consecutive rounds that fit ``budget_bytes``.

    A round takes items while ``bytes_per_param * sum(params)`` stays within the budget. ``None``:
    no limit, one round. No items: no rounds. An item alone over the budget is a ResourceError.
    """
    if not items:
        return []
    if budget_bytes is None:
        return [[key for key, _ in items]]
    out: list[list[str]] = []
    used = 0.0  # bytes of the open round
    for key, params in items:
        need = bytes_per_param * params
        if need > budget_bytes:
            raise ResourceError(f"variant {key} needs {format_bytes(need)} but a rank has {format_bytes(budget_bytes)} "
                                "for variants; raise --max-memory-per-rank or use more ranks")
        if not out or used + need > budget_bytes:
            out.append([])
            used = 0.0
        out[-1].append(key)
        used += need
    return out


def pad_rounds(plan: list[list[str]], count: int) -> list[list[str]]:
    """``plan`` followed by empty rounds up to ``count`` rounds."""
    return [list(r) for r in plan] + [[] for _ in range(count - len(plan))]


def agree_rounds(session: Session, items: Sequence[tuple[str, int]], max_memory_bytes: float | None, *,
                 bytes_per_param: int, stage: str = "bld") -> list[list[list[str]]]:
    """Plan this rank's ``items`` (see :func:`plan_rounds`) and agree with the other ranks on a round count.

    ``stage``: ``bld`` or ``build``, whose memory outside the variants differs (:func:`fixed_bytes`).
    Returns every rank's plan padded with empty rounds to the largest count (at least 1),
    ``table[rank][round]``, on every rank. A ResourceError on any rank is raised on every rank.
    """
    shard = session.shard
    try:
        mine: list[list[str]] | str = plan_rounds(items, variant_budget(session, max_memory_bytes, stage=stage),
                                                  bytes_per_param=bytes_per_param)
    except ResourceError as e:
        mine = str(e)
    plans = shard.gather(mine)
    out = None
    if shard.first:
        errors = [p for p in plans if isinstance(p, str)]
        count = max(1, max((len(p) for p in plans if not isinstance(p, str)), default=0))
        out = errors[0] if errors else [pad_rounds(p, count) for p in plans]
    out = shard.broadcast(out)
    if isinstance(out, str):
        raise ResourceError(out)
    return out


def fixed_bytes(session: Session, stage: str = "bld") -> float:
    """A rank's memory that no round changes (:mod:`block_library.memory`, the counts the resource plan
    uses): the process, its teacher layers, the embedding on rank 0, the activations of a batch, and
    for the build the calibration statistics. Tests monkeypatch this function."""
    from block_library.memory import bld_fixed_bytes, build_fixed_bytes, layer_sizes

    c = session.config
    sizes = layer_sizes(session.parent_config, c.space)
    common = dict(first=session.shard.first, batch=c.bld.batch_size, seq_len=c.data.seq_len,
                  dtype_bytes=session.compute_dtype.itemsize, device=session.shard.device.type)
    if stage == "build":
        return build_fixed_bytes(session.parent_config, sizes, list(session.shard.layers), **common,
                                 ffn_refit=c.bld.ffn_refit)
    return bld_fixed_bytes(session.parent_config, sizes, list(session.shard.layers), **common)


def variant_budget(session: Session, max_memory_bytes: float | None, *, stage: str = "bld") -> float | None:
    """Bytes a rank may spend on variants in one round (None: no limit)."""
    if max_memory_bytes is None:
        return None
    fixed = fixed_bytes(session, stage)
    if fixed >= max_memory_bytes:
        raise ResourceError(f"rank {session.shard.rank} needs {format_bytes(fixed)} before any variant (teacher "
                            f"layers, embedding, activations, the process) but --max-memory-per-rank is "
                            f"{format_bytes(max_memory_bytes)}; raise it or use more ranks")
    return max_memory_bytes - fixed


def summary(table: list[list[list[str]]], params: dict[str, int], *, bytes_per_param: int) -> list[dict[str, Any]]:
    """Per round: variants over all ranks, per-rank counts and the fullest rank's bytes."""
    out = []
    for k in range(len(table[0])):
        per_rank = [table[r][k] for r in range(len(table))]
        out.append({"variants": sum(map(len, per_rank)), "sizes": [len(keys) for keys in per_rank],
                    "bytes": max(bytes_per_param * sum(params[key] for key in keys) for keys in per_rank)})
    return out


def release(device: Any) -> None:
    """Return a finished round's memory to the system (its modules are no longer referenced)."""
    import gc

    import torch

    gc.collect()
    if getattr(device, "type", None) == "cuda":
        torch.cuda.empty_cache()
