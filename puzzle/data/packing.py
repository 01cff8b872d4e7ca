"""Tokenize a document stream and pack it into fixed-length training sequences.

    doc A (2 pieces)       doc B
    [a a a a][a a]  EOS    [b b b] EOS  [c c ...
    └──── one token stream, cut every seq_len tokens ────┘ -> (seq_len,) rows

Pieces are tokenized in batches (fast tokenizers encode a batch in parallel) whose size in
characters starts small and doubles up to a cap, so asking for a few sequences reads little
and memory stays bounded: at most one batch of text plus one batch of ids is held at a time.
The tokenizer adds no BOS/EOS of its own (``add_special_tokens=False``); the EOS id follows
the last piece of each document. The final, incomplete sequence is dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from puzzle.data.sources import Document, iter_documents, source_names
from puzzle.errors import DataError

log = logging.getLogger(__name__)

FIRST_BATCH_CHARS = 16 * 1024
MAX_BATCH_CHARS = 1 << 20


def _batches(documents: Iterable[Document]) -> Iterator[list[Document]]:
    """Consecutive documents grouped into batches of growing size (in characters)."""
    budget = FIRST_BATCH_CHARS
    batch: list[Document] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= budget:
            yield batch
            batch, chars = [], 0
            budget = min(2 * budget, MAX_BATCH_CHARS)
    if batch:
        yield batch


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: texts longer than model_max_length are fine here, we cut them ourselves.
    out = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return out["input_ids"]


def pack_sequences(documents: Iterable[Document], tokenizer: Any, *, seq_len: int,
                   eos_token_id: int | None = None) -> Iterator[torch.Tensor]:
    """Yield ``(seq_len,)`` int64 tensors of consecutive tokens of ``documents``.

    ``eos_token_id`` defaults to ``tokenizer.eos_token_id``; when neither is set, documents are
    concatenated without a separator.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        log.info("no EOS token id: documents are packed without a separator")
    buffer: list[int] = []  # token ids not yet emitted; fewer than seq_len between batches
    for batch in _batches(documents):
        for doc, ids in zip(batch, _encode(tokenizer, [d.text for d in batch])):
            buffer.extend(ids)
            if doc.ends and eos is not None:
                buffer.append(eos)
        full = len(buffer) // seq_len
        if full:
            rows = torch.tensor(buffer[: full * seq_len], dtype=torch.long).view(full, seq_len)  # (full, seq_len)
            del buffer[: full * seq_len]
            yield from rows.unbind(0)  # each (seq_len,), views of one block


def load_sequences(sources: Sequence[str | os.PathLike[str]] | str | None, tokenizer: Any, *, seq_len: int,
                   num_sequences: int, split: str = "train", val_fraction: float = 0.05) -> torch.Tensor:
    """The first ``num_sequences`` packed sequences of ``sources``: int64 ``(N, seq_len)``.

    Reading stops as soon as ``num_sequences`` are ready. ``N < num_sequences`` only when the
    corpus runs out (logged as a warning); no sequence at all raises :class:`DataError`.
    """
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 1:
        raise DataError(f"num_sequences must be a positive integer, got {num_sequences!r}")
    documents = iter_documents(sources, split=split, val_fraction=val_fraction)
    rows: list[torch.Tensor] = []
    try:
        for row in pack_sequences(documents, tokenizer, seq_len=seq_len):
            rows.append(row)
            if len(rows) == num_sequences:
                break
    finally:
        documents.close()  # release the open file now, not at garbage collection
    names = source_names(sources)
    if not rows:
        raise DataError(f"the {split!r} split of {names} holds fewer than {seq_len} tokens: no full sequence "
                        f"of seq_len={seq_len}; add data or lower seq_len")
    if len(rows) < num_sequences:
        log.warning("the %r split of %s ran out after %d of %d sequences of %d tokens",
                    split, names, len(rows), num_sequences, seq_len)
    return torch.stack(rows)  # (N, seq_len)
