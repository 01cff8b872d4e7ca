"""The data layer: text sources streamed as documents, tokenized and packed into sequences.

Typical use::

    from puzzle.data import DataConfig, iter_documents, load_sequences, pack_sequences
    from puzzle.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    cfg = DataConfig()                                   # the Python standard library, seq_len 256
    kw = dict(seq_len=cfg.seq_len, val_fraction=cfg.val_fraction)
    train = load_sequences(cfg.sources, tok, num_sequences=512, **kw)                   # (512, 256)
    val = load_sequences(cfg.sources, tok, num_sequences=64, split="validation", **kw)  # (64, 256)

    # Or stream without a bound:
    for row in pack_sequences(iter_documents(["corpus/", "extra.jsonl"]), tok, seq_len=1024):
        ...                                              # row: (1024,) int64

Sources are ``"stdlib"``, text files, directories, ``.jsonl`` (a ``text`` field) and
``.parquet`` (a ``text`` column); see :mod:`puzzle.data.sources` for keys and the split rule.
"""

from puzzle.data.config import DataConfig
from puzzle.data.packing import load_sequences, pack_sequences
from puzzle.data.sources import SPLITS, CorpusStats, Document, corpus_stats, iter_documents, split_of, stdlib_files

__all__ = [
    "SPLITS",
    "CorpusStats",
    "DataConfig",
    "Document",
    "corpus_stats",
    "iter_documents",
    "load_sequences",
    "pack_sequences",
    "split_of",
    "stdlib_files",
]
