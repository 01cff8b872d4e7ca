"""``DataConfig``: which corpus to read and how to cut it, as it appears in a YAML config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from puzzle.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The corpus used for distillation, scoring and validation."""

    sources: tuple[str, ...] = ("stdlib",)
    """Files (.txt .md .py .rst ... .jsonl .parquet), directories, or ``stdlib`` (the Python standard library)."""
    seq_len: int = 256
    """Tokens per packed training sequence (at least 2: inputs and shifted targets)."""
    val_fraction: float = 0.05
    """Fraction of documents, chosen by a hash of their key, held out for validation (0 < f < 1)."""

    def __post_init__(self) -> None:
        sources = (self.sources,) if isinstance(self.sources, str) else tuple(self.sources)
        if not sources or not all(isinstance(s, str) and s for s in sources):
            raise ConfigError(f"data.sources must be a non-empty list of paths or 'stdlib', got {self.sources!r}")
        object.__setattr__(self, "sources", sources)
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be an integer >= 2, got {self.seq_len!r}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be a number strictly between 0 and 1, got {self.val_fraction!r}")
        object.__setattr__(self, "val_fraction", float(self.val_fraction))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        """Build from a mapping (e.g. the ``data:`` section of a YAML file); unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"the data section must be a mapping, got {type(data).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(f"data: unknown key(s) {unknown}; allowed keys are {allowed}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain types (sources as a list), for YAML files and stage manifests."""
        out = asdict(self)
        out["sources"] = list(self.sources)
        return out
