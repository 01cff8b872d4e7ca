"""Runs of attention-free FFN blocks, and the choice of which sub-runs to fuse (no torch).

A *run* is a maximal range of consecutive layers whose attention is ``no_op`` and whose FFN is
a SwiGLU. Inside a run every block is ``x -> x + FFN_k(norm_k(x))``; fusing a *segment* of it
replaces those blocks by one block that applies every FFN to the segment's input and adds the
outputs (see :mod:`puzzle.fusion.fuse`). Layer ranges are half-open ``[start, stop)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from puzzle.errors import ConfigError
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig


@dataclass(frozen=True)
class Segment:
    """Layers ``start .. stop - 1`` of an architecture, to be fused into one block."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.stop <= self.start:
            raise ConfigError(f"segment [{self.start}, {self.stop}) is empty or negative")

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def label(self) -> str:
        """``20-23`` (inclusive, as people write layer ranges); ``7`` for one layer."""
        return f"{self.start}-{self.stop - 1}" if len(self) > 1 else str(self.start)


def is_fusable(block: BlockConfig) -> bool:
    """Attention-free block with a SwiGLU FFN: the only kind whose FFN can join a parallel sum."""
    return block.attention.kind == "no_op" and block.ffn.kind == "swiglu"


def find_runs(blocks: Sequence[BlockConfig], *, min_length: int = 2) -> list[Segment]:
    """Maximal runs of consecutive fusable blocks with at least ``min_length`` layers, in order."""
    runs, start = [], None
    for i, block in enumerate([*blocks, None]):
        if block is not None and is_fusable(block):
            start = i if start is None else start
            continue
        if start is not None and i - start >= min_length:
            runs.append(Segment(start, i))
        start = None
    return runs


def fused_width(blocks: Sequence[BlockConfig], segment: Segment) -> int:
    """Intermediate size of the fused SwiGLU: the sum of the segment's widths."""
    return sum(blocks[i].ffn.intermediate_size for i in segment.layers)


def check_segments(blocks: Sequence[BlockConfig], segments: Sequence[Segment]) -> list[Segment]:
    """Sorted, non-overlapping segments of fusable blocks; raise :class:`ConfigError` naming the fix."""
    out = sorted(segments, key=lambda s: s.start)
    for a, b in zip(out, out[1:]):
        if b.start < a.stop:
            raise ConfigError(f"fusion segments {a.label} and {b.label} overlap")
    for s in out:
        if s.stop > len(blocks):
            raise ConfigError(f"fusion segment {s.label} is past the last layer ({len(blocks) - 1})")
        bad = [i for i in s.layers if not is_fusable(blocks[i])]
        if bad:
            labels = ", ".join(f"{i} ({blocks[i].label})" for i in bad)
            raise ConfigError(f"fusion segment {s.label}: layers {labels} are not attention-free SwiGLU blocks; "
                              f"only layers with attention no_op and a swiglu FFN can be fused")
    return out


def fused_blocks(blocks: Sequence[BlockConfig], segments: Sequence[Segment]) -> tuple[list[BlockConfig], list[int]]:
    """The architecture after fusing ``segments``, and for each new layer the first old layer it covers."""
    segments = check_segments(blocks, segments)
    starts = {s.start: s for s in segments}
    out, origin, i = [], [], 0
    while i < len(blocks):
        s = starts.get(i)
        if s is None or len(s) == 1:
            out.append(blocks[i])
            origin.append(i)
            i += 1
            continue
        out.append(BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.swiglu(fused_width(blocks, s))))
        origin.append(i)
        i = s.stop
    return out, origin


def parse_segments(text: str) -> list[Segment]:
    """``"20-23,25-27"`` (inclusive ranges, as printed in reports) -> segments."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, dash, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ConfigError(f"cannot read layer range {part!r}; write ranges like 20-23,25-27") from None
        if b < a:
            raise ConfigError(f"layer range {part!r} ends before it starts")
        out.append(Segment(a, b + 1))
    if not out:
        raise ConfigError(f"no layer range in {text!r}; write ranges like 20-23,25-27")
    return out


SEGMENT_SCORES = ("mean", "max")


def segment_score(dependency: Sequence[Sequence[float]], lo: int, hi: int, *, how: str = "mean") -> float:
    """Mean (or max) pairwise dependency ``d[i][j]`` over ``lo <= i < j < hi`` (0 for a single layer).

    ``dependency`` is indexed relative to its run (``d[0][1]`` is the run's first two layers).
    ``mean`` is the FFN Fusion paper's run-level view; ``max`` asks every pair to be independent.
    """
    if how not in SEGMENT_SCORES:
        raise ConfigError(f"segment score {how!r} is not one of {SEGMENT_SCORES}")
    pairs = [dependency[i][j] for i in range(lo, hi) for j in range(i + 1, hi)]
    if not pairs:
        return 0.0
    return sum(pairs) / len(pairs) if how == "mean" else max(pairs)


def choose_segments(run: Segment, dependency: Sequence[Sequence[float]], widths: Sequence[int], *,
                    threshold: float, max_width: int | None = None, how: str = "mean") -> list[Segment]:
    """Split ``run`` into as few consecutive segments as possible, each with a mean (``how``) pairwise
    dependency <= ``threshold`` and a fused width <= ``max_width``; ties go to the lowest total
    dependency. Segments of one layer stay unfused; only those of two or more are returned.

    This is an exact dynamic program over the run's split points (O(n^2) segments, n <= layers).
    """
    n = len(run)
    if len(dependency) != n or len(widths) != n:
        raise ConfigError(f"run {run.label}: dependency has {len(dependency)} rows and {len(widths)} widths for {n} layers")
    inf = (float("inf"), float("inf"))
    best: list[tuple[float, float]] = [(0.0, 0.0)] + [inf] * n  # (segments, total score) to cover [0, k)
    back = [0] * (n + 1)
    for k in range(1, n + 1):
        for j in range(k):
            width = sum(widths[j:k])
            score = segment_score(dependency, j, k, how=how)
            ok = k - j == 1 or (score <= threshold and (max_width is None or width <= max_width))
            if not ok or best[j] == inf:
                continue
            cand = (best[j][0] + 1, best[j][1] + score)
            if cand < best[k]:
                best[k], back[k] = cand, j
    cuts, k = [], n
    while k > 0:
        cuts.append((back[k], k))
        k = back[k]
    return [Segment(run.start + a, run.start + b) for a, b in reversed(cuts) if b - a > 1]


def split_at_ranks(segments: Sequence[Segment], ranges: Sequence[range], *, min_length: int = 2) -> list[Segment]:
    """``segments`` cut where one rank's layers end and the next one's begin (``ranges``: contiguous,
    as :func:`block_library.distributed.split_layers` gives them); pieces shorter than ``min_length``
    are dropped. A layer-sharded fusion works on these pieces, so no segment ever spans two ranks."""
    cuts = sorted({r.start for r in ranges} | {r.stop for r in ranges})
    out = []
    for s in segments:
        edges = [s.start, *(c for c in cuts if s.start < c < s.stop), s.stop]
        out += [Segment(a, b) for a, b in zip(edges, edges[1:]) if b - a >= min_length]
    return out
