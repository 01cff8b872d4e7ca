"""Measured serving speed of models side by side on this device (parent first, then children).

Each scenario times every model in interleaved rounds (:func:`measure_models_ms`), so drift on a
shared machine hits all of them alike; the fastest step over all rounds is kept per model.

    tokens_per_s = batch * new_tokens / seconds   (prefill: the prompt tokens; decode: one per sequence)
    speedup      = ms of the first model / ms     (1.0 for the first model itself)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
from tqdm.auto import tqdm

from puzzle.errors import ConfigError
from puzzle.model import PuzzleForCausalLM
from puzzle.profiler.model_speed import measure_models_ms
from puzzle.profiler.scenario import Scenario, default_scenarios

COLUMNS = ["model", "scenario", "phase", "batch", "length", "ms", "tokens_per_s", "speedup", "device", "dtype"]


def measure_speed(models: Mapping[str, PuzzleForCausalLM], scenarios: Sequence[Scenario] | None = None, *,
                  rounds: int = 5, repeats: int = 2, progress: bool = False) -> pd.DataFrame:
    """One row per (scenario, model), in the order given; ``scenarios`` defaults to prefill b1x1024 and
    decode b8 ctx1024. The first model is the reference of ``speedup``."""
    if not models:
        raise ConfigError("measure_speed needs at least one model")
    scenarios = list(scenarios) if scenarios is not None else default_scenarios()
    names = list(models)
    rows = []
    for sc in tqdm(scenarios, desc=f"speed ({len(names)} models)", unit="scenario", disable=not progress):
        times = measure_models_ms([models[n] for n in names], sc, rounds=rounds, repeats=repeats)
        for name, ms in zip(names, times):
            param = next(models[name].parameters())
            rows.append({"model": name, "scenario": sc.name, "phase": sc.phase, "batch": sc.batch,
                         "length": sc.length, "ms": ms, "tokens_per_s": sc.tokens / (ms / 1000),
                         "speedup": times[0] / ms, "device": param.device.type,
                         "dtype": str(param.dtype).removeprefix("torch.")})
    return pd.DataFrame(rows, columns=COLUMNS)
