"""``SearchConfig``: everything ``puzzle search`` reads; YAML keys mirror the command-line flags.

    # runs/search.yaml -- run with: puzzle search --config runs/search.yaml
    model: smollm2-135m
    budget: 8xH100
    speedup: 1.5
    preset: quick

Unset stage sizes come from the preset: ``quick`` finishes SmolLM2-135M on a 2-core CPU in
minutes; ``full`` uses the stage defaults of ``puzzle library`` / ``score`` / ``fuse``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.errors import ConfigError

BASELINES = ("uniform_ffn", "shortgpt", "attention_removal")
"""Baseline rules of the ``baselines`` stage (see :mod:`puzzle.search.baselines`)."""

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"bld_tokens": 4096, "score_sequences": 2, "score_seq_len": 128, "fuse_sequences": 4,
              "gkd_steps": 16, "gkd_batch": 2, "eval_sequences": 4},
    "full": {"bld_tokens": 65536, "score_sequences": 8, "score_seq_len": 256, "fuse_sequences": 8,
             "gkd_steps": 200, "gkd_batch": 4, "eval_sequences": 16},
}


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """One ``puzzle search`` run."""

    model: str = "smollm2-135m"
    """Parent: an embedded name or a model directory (never downloaded)."""
    data: tuple[str, ...] = ("stdlib",)
    """Corpus for every stage: stdlib, text files, directories, .jsonl, .parquet."""
    budget: str = "8xH100"
    """Target hardware: COUNTxGPU (tensor-parallel degree x accelerator) or cpu."""
    dtype: str | None = None
    """Serving dtype on the target: bf16 or fp8 (GPUs; default bf16), fp32 (cpu)."""
    speedup: float | None = None
    """Minimum predicted step-time speedup over the parent in ``scenario`` (default 1.5 if no other budget)."""
    throughput: float | None = None
    """Minimum predicted tokens/s in ``scenario``."""
    memory: float | None = None
    """Maximum GiB per device for weights + KV cache (``batch`` x ``context``)."""
    scenario: str = "decode"
    """Serving phase the budget is about: decode or prefill."""
    batch: int = 8
    """Sequences per step in the budget's scenario."""
    context: int = 1024
    """Tokens per sequence (KV cache for decode, prompt for prefill)."""
    solver: str = "ortools-mip"
    """MIP backend: ortools-mip, pulp, cpsat."""
    constraints: tuple[str, ...] = ()
    """Custom MIP constraints, e.g. ``count(attention != no_op) >= 8`` (see :mod:`solvers.parse`)."""
    calibrate: bool | None = None
    """Time this machine's blocks and fit the roofline before costing (default: on for ``cpu``, which is here)."""
    baselines: tuple[str, ...] = ()
    """Baselines built at the same budget and given the same GKD: uniform_ffn, shortgpt, attention_removal."""
    preset: str = "quick"
    """Stage sizes: quick (minutes on a laptop CPU) or full."""
    bld_tokens: int | None = None
    """Tokens of block-wise local distillation (preset)."""
    score_sequences: int | None = None
    """Held-out sequences for replace-1-block scoring (preset)."""
    score_seq_len: int | None = None
    """Tokens per scoring sequence (preset)."""
    fuse_threshold: float | None = None
    """Largest max-pairwise FFN dependency of a fused segment; 0 disables fusion (default: 0.2 on GPUs, 0 on
    cpu, where one wide SwiGLU is slower than the narrow ones it replaces: ``benchmarks/fusion.py``)."""
    fuse_sequences: int | None = None
    """Calibration and held-out sequences of the fusion stage (preset)."""
    fuse_distill_steps: int = 100
    """Local distillation steps of each fused block."""
    gkd_steps: int | None = None
    """Global distillation steps (preset); 0 skips GKD."""
    gkd_batch: int | None = None
    """Sequences per GKD step (preset)."""
    eval_sequences: int | None = None
    """Held-out sequences of the final evaluation (preset)."""
    measure_speed: bool = True
    """Measure parent and child step time on this machine in the evaluation."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("data", "constraints", "baselines"):
            v = getattr(self, name)
            object.__setattr__(self, name, (v,) if isinstance(v, str) else tuple(v))
        if self.fuse_threshold is None:
            object.__setattr__(self, "fuse_threshold", 0.0 if self.budget.strip().lower() == "cpu" else 0.2)
        if self.calibrate is None:
            object.__setattr__(self, "calibrate", self.budget.strip().lower() == "cpu")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ConfigError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
        for text in self.constraints:
            from solvers.errors import ConstraintSyntaxError
            from solvers.parse import parse_constraint

            try:
                parse_constraint(text)
            except ConstraintSyntaxError as e:
                raise ConfigError(str(e)) from e
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.scenario not in ("decode", "prefill"):
            raise ConfigError(f"scenario must be decode or prefill, got {self.scenario!r}")
        for name in ("speedup", "throughput", "memory"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be positive, got {v}")
        if self.speedup is None and self.throughput is None and self.memory is None:
            object.__setattr__(self, "speedup", 1.5)
        for name in ("batch", "context", "bld_tokens", "score_sequences", "score_seq_len", "fuse_sequences",
                     "eval_sequences", "gkd_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gkd_steps < 0 or self.fuse_distill_steps < 0 or self.fuse_threshold < 0:
            raise ConfigError("gkd_steps, fuse_distill_steps and fuse_threshold must be >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"search config: unknown key(s) {unknown}; allowed keys are {sorted(names)}")
        return cls(**{k.replace("-", "_"): v for k, v in data.items()})

    @classmethod
    def from_file(cls, path: str | Path) -> SearchConfig:
        from puzzle.io import read_yaml_config

        data = read_yaml_config(path) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of flag names to values")
        return cls.from_dict({k.replace("-", "_"): v for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("data", "constraints", "baselines"):
            out[name] = list(getattr(self, name))
        return out

    def replace(self, **changes: Any) -> SearchConfig:
        return dataclasses.replace(self, **changes)

