"""Quality by context length: the same held-out metrics on sequences of 256 tokens (the library's BLD length), of
the quality context (the served one by default) and, where the parent's positions reach, of twice it: a child
costed at 1024 tokens of KV cache can lose more to its parent there than at 256 tokens.

    contexts = report_contexts(served=1024, max_positions=8192)            # (256, 1024, 2048)
    plan = context_sequences(contexts, tokens=16 * 256)                    # {256: 16, 1024: 4, 2048: 2}
    by = quality_by_context(child, tok, parent=parent, sources=["stdlib"], sequences=plan)
    by[1024]["kl"], by[1024]["ppl"], by[1024]["top1_agreement"]

Every context reads the validation split from its start, packed at its own length: the longer contexts see
the same first documents in fewer, longer rows. Each context gets about the same number of tokens (at least
:data:`LEAST_SEQUENCES` rows), so the time of a context grows only with its attention.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from puzzle.errors import ConfigError

BASE_CONTEXT = 256
"""The library's BLD length: the first column of every comparison."""
LEAST_SEQUENCES = 2
"""Rows per context at least: one chunk of the evaluation (and a mean over more than one document)."""


def report_contexts(served: int, max_positions: int | None, *, base: int = BASE_CONTEXT) -> tuple[int, ...]:
    """The contexts a report shows: ``base``, the ``served`` context and twice it where the parent's rotary
    positions reach (``max_positions``; None: no limit known), ascending and distinct."""
    if served < 2:
        raise ConfigError(f"the served context must be at least 2 tokens, got {served}")
    limit = max_positions or math.inf
    out = {base, served} | ({2 * served} if 2 * served <= limit else set())
    return tuple(sorted(c for c in out if c <= limit))


def context_sequences(contexts: Sequence[int], tokens: int, *, least: int = LEAST_SEQUENCES) -> dict[int, int]:
    """``{context: rows}`` holding about ``tokens`` tokens at each context (at least ``least`` rows)."""
    return {c: max(least, round(tokens / c)) for c in contexts}


def check_contexts(contexts: Sequence[int], max_positions: int | None) -> None:
    """Raise :class:`ConfigError` for a context under 2 tokens or past the model's positions."""
    for c in contexts:
        if c < 2:
            raise ConfigError(f"--context {c}: a context needs at least 2 tokens (one next-token position)")
        if max_positions and c > max_positions:
            raise ConfigError(f"--context {c}: past the model's {max_positions} positions "
                              f"(max_position_embeddings); pass at most {max_positions}")


def quality_by_context(model: Any, tokenizer: Any, *, parent: Any | None, sources: Sequence[str | os.PathLike[str]],
                       sequences: Mapping[int, int], chunk: int = 2,
                       progress: bool = False) -> dict[int, dict[str, float]]:
    """:func:`~puzzle.evaluation.quality.evaluate_quality` at each context of ``sequences`` (``{context: rows}``)
    on the validation split of ``sources``; one process, both models whole. Each result also holds
    ``context`` and ``sequences`` (the rows read: fewer where the split ran out)."""
    from puzzle.data.packing import load_sequences
    from puzzle.evaluation.quality import evaluate_quality

    out: dict[int, dict[str, float]] = {}
    for context, rows in sorted(sequences.items()):
        ids = load_sequences(sources, tokenizer, seq_len=context, num_sequences=rows, split="validation")  # (N, T)
        q = evaluate_quality(model, ids, parent=parent, chunk=context_chunk(context, chunk), progress=progress)
        out[context] = {"context": context, "sequences": int(ids.shape[0]), **q}
    return out


def context_chunk(context: int, chunk: int = 2) -> int:
    """Rows per forward at ``context``: ``chunk`` at the base context, fewer at longer ones so that a chunk holds
    at most ``chunk`` x :data:`BASE_CONTEXT` positions (the log-prob buffers stay the size they are at 256)."""
    return max(1, min(chunk, chunk * BASE_CONTEXT // context))


def to_json(by_context: Mapping[int, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """JSON keys are strings: ``{"1024": {...}}``."""
    return {str(c): dict(q) for c, q in sorted(by_context.items())}


def from_json(doc: Mapping[str, Mapping[str, float]] | None) -> dict[int, dict[str, float]]:
    """The inverse of :func:`to_json` (an evaluation written before quality by context: ``{}``)."""
    return {int(c): dict(q) for c, q in (doc or {}).items()}
