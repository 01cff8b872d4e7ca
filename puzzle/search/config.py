"""``SearchConfig``: what the user said for one ``puzzle search`` run, and nothing else.

    # runs/search.yaml -- run with: puzzle search --config runs/search.yaml
    model: smollm2-135m
    budget: 8xH100
    speedup: 1.5
    preset: quick

Every field is ``None`` until someone sets it: a YAML file, a command-line flag or a keyword of
``puzzle.search(...)``. Sources merge by one rule (:meth:`SearchConfig.merge`): a later source
overrides an earlier one field by field, and an explicit value is never dropped.
:func:`puzzle.search.plan.resolve` is the only place that fills in defaults (presets, dtype,
speedup, calibration, fusion threshold) and reads the hardware string; stages read that plan.
Values are type-checked here, so ``speedup: "fast"`` is a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.engines.rules import ENGINE_NAMES
from puzzle.errors import ConfigError

BASELINES = ("uniform_ffn", "shortgpt", "attention_removal")
"""Baseline rules of the ``baselines`` stage (see :mod:`puzzle.search.baselines`)."""

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"bld_tokens": 4096, "bld_eval_sequences": 16, "score_sequences": 2, "score_seq_len": 128, "fuse_sequences": 4,
              "finalists": 4, "refine_rounds": 0, "child_bld_tokens": 16384, "child_refit": False, "gkd_steps": 16, "gkd_batch": 2, "eval_sequences": 4},
    "full": {"bld_tokens": 65536, "bld_eval_sequences": 16, "score_sequences": 8, "score_seq_len": 256, "fuse_sequences": 8,
             "finalists": 8, "refine_rounds": 0, "child_bld_tokens": 131072, "child_refit": True, "gkd_steps": 200, "gkd_batch": 4, "eval_sequences": 16},
}
SOURCES = ("default", "preset", "derived", "file", "flag", "keyword")
"""Where a setting's value came from, as a plan reports it."""


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """One ``puzzle search`` run as the user wrote it (``None``: not said; the plan fills it in)."""

    model: str | None = None
    """Parent: an embedded name or a model directory (never downloaded). Default: smollm2-135m."""
    data: tuple[str, ...] | None = None
    """Corpus for every stage: stdlib, text files, directories, .jsonl, .parquet. Default: stdlib."""
    budget: str | None = None
    """Deployment hardware: COUNTxGPU (one node: ``8xH100``) or cpu (this machine). Default: 8xH100."""
    cluster: str | None = None
    """The machines that run the search (not the deployment): ranks x device, ``8xH100``, ``64xH100``, ``2xcpu``.
    Default: this process group (``torchrun``'s world size) on this machine's device."""
    max_memory_per_rank: str | None = None
    """Memory a rank may fill, e.g. ``6GiB`` or ``72GB`` (default: the device's memory less 10%; on the CPU
    this machine's RAM less 10%, split between the ranks). BLD trains its variants in rounds that fit it."""
    tp: int | None = None
    """Tensor-parallel degree on the target (default: the smallest that engines accept and that fits)."""
    dtype: str | None = None
    """Serving dtype on the target: bf16 or fp8 (GPUs; default bf16), fp32 (cpu)."""
    speedup: float | None = None
    """Minimum predicted step-time speedup over the parent in ``scenario`` (default 1.5 if no other budget)."""
    throughput: float | None = None
    """Minimum predicted tokens/s of the whole target (all replicas) in ``scenario``."""
    memory: float | None = None
    """Maximum GiB per device for weights + KV cache (``batch`` x ``context``)."""
    scenario: str | None = None
    """Serving phase the budget is about: decode or prefill. Default: decode."""
    batch: int | None = None
    """Sequences per step of one replica in the budget's scenario. Default: 8."""
    context: int | None = None
    """Tokens per sequence (KV cache for decode, prompt for prefill). Default: 1024."""
    solver: str | None = None
    """MIP backend: ortools-mip, pulp, cpsat. Default: ortools-mip."""
    constraints: tuple[str, ...] | None = None
    """Custom MIP constraints, e.g. ``count(attention != no_op) >= 8`` (see :mod:`solvers.parse`)."""
    calibrate: bool | None = None
    """Time this machine's blocks and fit the roofline before costing (default: on for ``cpu``, which is here)."""
    baselines: tuple[str, ...] | None = None
    """Baselines built at the same budget and given the same GKD: uniform_ffn, shortgpt, attention_removal."""
    engine: str | None = None
    """The serving engine the child must load in: vllm, sglang, trtllm, llamacpp or transformers
    (:mod:`puzzle.engines`). The search space, fusion and export keep to what it loads. Default: vllm."""
    space: Mapping[str, Any] | None = None
    """The search space, as a library config's ``space:`` section: attention and FFN variants and per-layer
    overrides (:mod:`block_library.space`). Default: GQA with fewer KV heads, linear and no-op attention;
    FFN widths 7/8 .. 1/8 of the parent's, linear and no-op FFNs; less what ``engine`` cannot load (vLLM, the
    default: no linear sub-blocks, no no-op attention in layer 0)."""
    preset: str | None = None
    """Stage sizes: quick (minutes on a laptop CPU) or full. Default: quick."""
    bld_tokens: int | None = None
    """Tokens of block-wise local distillation (preset)."""
    bld_eval_sequences: int | None = None
    """Sequences of 256 tokens that initialize the variants (calibration) and on which BLD reports each
    variant's normalized MSE (validation), each (preset)."""
    score_sequences: int | None = None
    """Held-out sequences for replace-1-block scoring (preset)."""
    score_seq_len: int | None = None
    """Tokens per scoring sequence (preset)."""
    finalists: int | None = None
    """The MIP's best solutions that differ in at least a tenth of their layers, each assembled and measured
    (KL to the parent on ``eval_sequences`` held-out sequences after the evaluation's); the lowest goes on
    (:mod:`puzzle.search.finalists`). 1: the MIP's optimum (preset; 1 on a multi-rank cluster)."""
    refine_rounds: int | None = None
    """Rounds of refinement after the finalists: the finalists' blocks re-scored around the best measured child
    and the MIP solved again on those scores (:mod:`puzzle.search.refine`); 0: off (preset; 0 on a multi-rank
    cluster)."""
    ffn_refit: bool | None = None
    """Refit each pruned FFN's down projection by least squares on the calibration tokens when the library is
    initialized (:mod:`block_library.ffn`; holds an (m, m) float64 Gram matrix per layer in host memory and
    solves on the device: on a 405B parent the library no longer fits 64xH100). Default: false."""
    child_bld_tokens: int | None = None
    """Tokens of child-aware BLD: after the MIP, the child's replaced sub-blocks retrained on the child's own
    activations (:mod:`puzzle.distill.child_bld`); 0 skips it (preset; 0 on a multi-rank cluster)."""
    child_refit: bool | None = None
    """Child-aware BLD first refits the child's pruned FFNs' down projections by least squares on the child's own
    stream (:mod:`puzzle.distill.child_refit`), then takes its gradient steps (preset: full on, quick off)."""
    fuse_threshold: float | None = None
    """Largest max-pairwise FFN dependency of a fused segment; 0 disables fusion (default: 0.2 on GPUs, 0 on
    cpu, where one wide SwiGLU is slower than the narrow ones it replaces: ``benchmarks/fusion.py``)."""
    fuse_sequences: int | None = None
    """Calibration and held-out sequences of the fusion stage (preset)."""
    fuse_distill_steps: int | None = None
    """Local distillation steps of each fused block. Default: 100."""
    gkd_steps: int | None = None
    """Global distillation steps (preset); 0 skips GKD."""
    gkd_batch: int | None = None
    """Sequences per GKD step (preset)."""
    gkd_top_k: int | None = None
    """The parent's top-k next-token log-probabilities (with the mass outside them and its last hidden state) on the
    GKD tokens, computed once and cached in safetensors for the child and every baseline
    (:mod:`puzzle.distill.teacher_cache`); 0: a live parent every step. Default: 64 (0 on a multi-rank cluster)."""
    eval_sequences: int | None = None
    """Held-out sequences of the final evaluation (preset)."""
    measure_speed: bool | None = None
    """Measure parent and child step time on this machine in the evaluation. Default: true."""
    seed: int | None = None
    """Seed of the order of training sequences in BLD, child-aware BLD and GKD (0: the split's own order for both
    BLDs, a fixed shuffle for GKD). Default: 0."""
    origin: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    """Where each set field came from: ``file``, ``flag`` or ``keyword`` (see :data:`SOURCES`)."""

    def __post_init__(self) -> None:
        for f in settings_fields():
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, _check(f.name, value))
        object.__setattr__(self, "origin", {k: v for k, v in dict(self.origin).items() if getattr(self, k) is not None})

    # ------------------------------------------------------------------ building and merging

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "keyword") -> SearchConfig:
        """The settings in ``data`` (``None`` values mean "not said"), all marked as coming from ``source``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"search config: expected a mapping of setting names to values, got {type(data).__name__}")
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        names = [f.name for f in settings_fields()]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"search config: unknown key(s) {unknown}; allowed keys are {sorted(names)}")
        set_ = {k: v for k, v in data.items() if v is not None}
        return cls(**set_, origin={k: source for k in set_})

    @classmethod
    def from_file(cls, path: str | Path) -> SearchConfig:
        from puzzle.io import read_yaml_config

        data = read_yaml_config(path)
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of flag names to values")
        try:
            return cls.from_dict(data, source="file")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def merge(self, overrides: Mapping[str, Any] | SearchConfig, *, source: str = "keyword") -> SearchConfig:
        """This config with every setting that ``overrides`` sets replacing ours (the one merge rule)."""
        other = overrides if isinstance(overrides, SearchConfig) else SearchConfig.from_dict(overrides, source=source)
        values = {f.name: getattr(self, f.name) for f in settings_fields()}
        origin = dict(self.origin)
        for name in other.given():
            values[name] = getattr(other, name)
            origin[name] = other.origin.get(name, source)
        return SearchConfig(**values, origin=origin)

    def without(self, *names: str) -> SearchConfig:
        """This config with ``names`` unset (their defaults apply again)."""
        values = {f.name: getattr(self, f.name) for f in settings_fields()}
        for name in names:
            values[name] = None
        return SearchConfig(**values, origin=self.origin)

    def given(self) -> list[str]:
        """The names of the settings the user set."""
        return [f.name for f in settings_fields() if getattr(self, f.name) is not None]

    def to_dict(self) -> dict[str, Any]:
        """The settings the user set (JSON-able: tuples as lists)."""
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in self.given()}

    def replace(self, **changes: Any) -> SearchConfig:
        return self.merge(changes)


def settings_fields() -> list[dataclasses.Field[Any]]:
    """The user-facing settings of :class:`SearchConfig` (every field but ``origin``)."""
    return [f for f in dataclasses.fields(SearchConfig) if f.name != "origin"]


_KINDS: dict[str, str] = {
    "model": "str", "data": "strs", "budget": "str", "cluster": "str", "max_memory_per_rank": "size",
    "tp": "int", "dtype": "str", "speedup": "float",
    "throughput": "float", "memory": "float", "scenario": "str", "batch": "int", "context": "int", "solver": "str",
    "constraints": "strs", "calibrate": "bool", "baselines": "strs", "engine": "str", "space": "mapping", "preset": "str",
    "bld_tokens": "int", "bld_eval_sequences": "int", "ffn_refit": "bool",
    "score_sequences": "int", "score_seq_len": "int", "finalists": "int", "refine_rounds": "int", "child_bld_tokens": "int", "child_refit": "bool", "fuse_threshold": "float", "fuse_sequences": "int",
    "fuse_distill_steps": "int", "gkd_steps": "int", "gkd_batch": "int", "gkd_top_k": "int", "eval_sequences": "int",
    "measure_speed": "bool", "seed": "int",
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("bf16", "fp8", "fp32"), "scenario": ("decode", "prefill"), "solver": ("ortools-mip", "pulp", "cpsat"),
    "preset": tuple(PRESETS), "engine": ENGINE_NAMES,
}
_AT_LEAST = {"tp": 1, "batch": 1, "context": 1, "bld_tokens": 1, "bld_eval_sequences": 1, "score_sequences": 1, "score_seq_len": 2,
             "fuse_sequences": 1, "eval_sequences": 1, "gkd_batch": 1, "gkd_top_k": 0, "gkd_steps": 0, "fuse_distill_steps": 0, "child_bld_tokens": 0, "finalists": 1,
             "refine_rounds": 0, "seed": 0}


def _check(name: str, value: Any) -> Any:
    """``value`` as the type of setting ``name``; a one-line :class:`ConfigError` naming it otherwise."""
    kind = _KINDS[name]
    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ConfigError(f"{name} must be one of {list(_CHOICES[name])}, got {value!r}")
        return value
    if kind == "strs":
        items = (value,) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) and x.strip() for x in items):
            raise ConfigError(f"{name} must be a list of non-empty strings, got {value!r}")
        return _check_items(name, tuple(items))
    if kind == "mapping":
        from block_library.space import SearchSpace

        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping (a library config's space: section), got {value!r}")
        data = dict(value.get("space", value)) if set(value) == {"space"} else dict(value)
        if "engine" in data:
            raise ConfigError("space: set the serving engine with the engine setting (--engine), not inside space")
        SearchSpace.from_dict(data)  # unknown keys and bad variants: one line naming them
        return data
    if kind == "size":
        from puzzle.search.cluster import parse_size

        parse_size(value, flag=name)
        return value if isinstance(value, str) else float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if kind == "int":
        if float(value) != int(value):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
        if value < _AT_LEAST[name]:
            raise ConfigError(f"{name} must be >= {_AT_LEAST[name]}, got {value}")
        return value
    value = float(value)
    if math.isnan(value):
        raise ConfigError(f"{name} must be a number, got nan")
    if name == "fuse_threshold":
        if not 0 <= value < math.inf:
            raise ConfigError(f"fuse_threshold must be >= 0 and finite, got {value}")
    elif not value > 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


def _check_items(name: str, items: tuple[str, ...]) -> tuple[str, ...]:
    if name == "data" and not items:
        raise ConfigError("data must name at least one source (stdlib, a file or a directory)")
    if name == "baselines":
        unknown = sorted(set(items) - set(BASELINES))
        if unknown:
            raise ConfigError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    if name == "constraints":
        from solvers.errors import ConstraintSyntaxError
        from solvers.parse import parse_constraint

        for text in items:
            try:
                parse_constraint(text)
            except ConstraintSyntaxError as e:
                raise ConfigError(str(e)) from e
    return items
