"""``LibraryConfig``: the search space, the BLD settings and the data, as one YAML file.

    # puzzle library build smollm2-135m --config library.yaml --out runs/lib
    space: {attention: {kv_heads: fewer}, ffn: {sizes: [0.75, 0.5, 0.25]}}
    bld: {tokens: 65536, batch_size: 8, lr: 1.0e-4}
    data: {sources: [stdlib], seq_len: 256}

Every section and key is optional; unknown keys are errors naming the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from block_library.schedule import TrainingSchedule
from block_library.space import SearchSpace
from puzzle.data import DataConfig
from puzzle.errors import ConfigError
from puzzle.io import config_from_yaml

DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class BLDConfig(TrainingSchedule):
    """Block-wise local distillation: how much, how fast, on what. ``lr``, ``warmup_fraction``, ``min_lr_ratio``
    and ``grad_clip`` are the schedule of :class:`~block_library.schedule.TrainingSchedule`."""

    tokens: int = 65_536
    """Training tokens; every variant of every layer sees all of them (one parent pass per batch)."""
    batch_size: int = 8
    """Sequences per optimizer step."""
    lr: float = 1e-4
    linear_lr_scale: float = 0.1
    """Learning-rate multiplier of linear variants: their least-squares init is already the optimum on
    the calibration tokens, so a full-size Adam step mostly adds noise."""
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Per variant: variants never share a norm."""
    calib_sequences: int = 16
    """Training-split sequences used to initialize variants (importance, least squares)."""
    val_sequences: int = 16
    """Validation-split sequences on which every variant's normalized MSE is reported."""
    ridge: float = 1e-3
    """Relative ridge term of the least-squares initialization of linear variants."""
    ffn_refit: bool = False
    """Refit a pruned FFN's down projection by least squares on the calibration tokens (:mod:`block_library.ffn`);
    holds an (m, m) float64 Gram matrix per layer during the build."""
    ffn_ridge: float = 0.1
    """Relative ridge term of the FFN refit, towards the plain copy of the kept channels (``ffn_refit``)."""
    checkpoint_every: int = 20
    """Steps between resumable checkpoints (0: none)."""
    seed: int = 0
    """Seed of the order in which the training sequences are visited (0: the split's own order)."""
    eval_every: int = 0
    """Steps between validation passes logged to ``bld/validation.csv`` (0: only before and after)."""
    dtype: str = "auto"
    """``auto`` (bf16 autocast on GPU, float32 on CPU), ``float32`` or ``bfloat16``."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_size", "calib_sequences", "val_sequences"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"bld.{name} must be a positive integer, got {v!r}")
        for name in ("checkpoint_every", "eval_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"bld.{name} must be an integer >= 0, got {v!r}")
        for name, lo, hi in (("lr", 0, None), ("linear_lr_scale", 0, None), ("warmup_fraction", -1e-12, 1), ("min_lr_ratio", -1e-12, 1),
                             ("weight_decay", -1e-12, None), ("grad_clip", -1e-12, None), ("ridge", 0, None), ("ffn_ridge", 0, None)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > lo or (hi is not None and v > hi):
                raise ConfigError(f"bld.{name} = {v!r} is out of range")
            object.__setattr__(self, name, float(v))
        if not isinstance(self.ffn_refit, bool):
            raise ConfigError(f"bld.ffn_refit must be true or false, got {self.ffn_refit!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"bld.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"bld.device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True, kw_only=True)
class LibraryConfig:
    """Everything ``puzzle library build`` / ``train`` read."""

    space: SearchSpace = field(default_factory=SearchSpace)
    bld: BLDConfig = field(default_factory=BLDConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> LibraryConfig:
        data = data or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"a library config must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"space", "bld", "data"})
        if unknown:
            raise ConfigError(f"library config: unknown key(s) {unknown}; allowed keys are ['bld', 'data', 'space']")
        bld = dict(data.get("bld") or {})
        allowed = [f.name for f in fields(BLDConfig)]
        bad = sorted(set(bld) - set(allowed))
        if bad:
            raise ConfigError(f"bld: unknown key(s) {bad}; allowed keys are {allowed}")
        return cls(space=SearchSpace.from_dict(data.get("space")), bld=BLDConfig(**bld),
                   data=DataConfig.from_dict(data.get("data") or {}))

    @classmethod
    def from_file(cls, path: str | Path) -> LibraryConfig:
        return config_from_yaml(path, cls.from_dict)

    def to_dict(self) -> dict[str, Any]:
        bld = asdict(self.bld)
        if not bld["seed"]:  # the split's order: libraries trained before the seed existed keep their hash
            del bld["seed"]
        if not bld["ffn_refit"]:  # off: libraries built before the refit existed keep their hash
            del bld["ffn_refit"], bld["ffn_ridge"]
        return {"space": self.space.to_dict(), "bld": bld, "data": self.data.to_dict()}

    def with_bld(self, **changes: Any) -> LibraryConfig:
        """A copy with some BLD fields changed (CLI flags); ``None`` values are ignored."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, bld=replace(self.bld, **changes)) if changes else self

    def sha256(self, *sections: str) -> str:
        """Hash of the named sections (all by default), for manifests and resume checks."""
        d = self.to_dict()
        d = {k: d[k] for k in (sections or d)}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
