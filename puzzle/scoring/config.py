"""``ScoreConfig``: what replace-1-block scoring reads and how it pairs sub-blocks.

    # puzzle score runs/lib --out runs/scores --sequences 8 --seq-len 256 --pairs additive
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from puzzle.errors import ConfigError

PAIRS = ("additive", "exact")


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """Held-out data, pairing mode and weights of a scoring run."""

    sources: tuple[str, ...] = ("stdlib",)
    """Corpus sources (``stdlib``, text files, directories, .jsonl, .parquet); the validation split is read."""
    seq_len: int = 256
    """Tokens per held-out sequence."""
    num_sequences: int = 8
    """Held-out sequences (default 8 x 256 = 2048 tokens)."""
    val_fraction: float | None = None
    """Fraction of documents held out for validation (the data layer's split rule); None: the library's,
    so no held-out document is one that BLD trained on."""
    pairs: str = "additive"
    """``additive``: measure each sub-block variant with the other sub-block kept as the parent's and
    score a block whose two halves both differ as the sum of its halves' scores; ``exact``: measure
    every attention x FFN combination."""
    initial: bool = False
    """Score the variants as initialized from the parent (before BLD) even if the library is trained."""
    variant_batch: int = 1
    """Replacements of one layer run together, stacked along the batch dimension (1: one at a time).
    On 2 CPU cores with SmolLM2-135M and 8 x 256 tokens, stacking 2 was no faster (3.3 vs 3.2 s a
    replacement) and 4 much slower (8.2 s): the work is already large matrix products."""
    head_chunk: int = 2
    """Sequences per LM-head evaluation: bounds the logits in memory to head_chunk x seq_len x vocab floats."""

    def __post_init__(self) -> None:
        sources = (self.sources,) if isinstance(self.sources, str) else tuple(self.sources)
        if not sources or not all(isinstance(s, str) and s for s in sources):
            raise ConfigError(f"sources must be a non-empty list of paths or 'stdlib', got {self.sources!r}")
        object.__setattr__(self, "sources", sources)
        for name, lo in (("seq_len", 2), ("num_sequences", 1), ("variant_batch", 1), ("head_chunk", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.pairs not in PAIRS:
            raise ConfigError(f"pairs must be one of {PAIRS}, got {self.pairs!r}")
        if self.val_fraction is not None and not (isinstance(self.val_fraction, float) and 0.0 < self.val_fraction < 1.0):
            raise ConfigError(f"val_fraction must be a float strictly between 0 and 1 (or None), got {self.val_fraction!r}")
        if not isinstance(self.initial, bool):
            raise ConfigError(f"initial must be true or false, got {self.initial!r}")

    def data_spec(self) -> dict[str, Any]:
        """What decides the held-out tokens (for the manifest and the resume check)."""
        return {"sources": list(self.sources), "seq_len": self.seq_len, "num_sequences": self.num_sequences,
                "val_fraction": self.val_fraction, "split": "validation"}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sources"] = list(self.sources)
        return out
