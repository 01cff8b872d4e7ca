"""Measured speed: one row per (scenario, model), the first model as the reference."""

from __future__ import annotations

import pytest

from puzzle.errors import ConfigError
from puzzle.evaluation import measure_speed
from puzzle.profiler.scenario import parse_scenario

SMALL = [parse_scenario("prefill:batch=1,prompt=16"), parse_scenario("decode:batch=2,context=16")]


def test_rows_times_and_speedup(model):
    table = measure_speed({"parent": model, "child": model}, SMALL, rounds=1, repeats=1)
    assert list(table.model) == ["parent", "child", "parent", "child"]
    assert list(table.scenario) == ["prefill", "prefill", "decode", "decode"]
    assert (table.ms > 0).all()
    first = table.groupby("scenario").head(1)
    assert (first.speedup == 1.0).all() and (first.model == "parent").all()
    # tokens per second: batch x prompt for prefill, batch (one token each) for decode
    expected = [16, 16, 2, 2]
    assert list(table.tokens_per_s) == pytest.approx([n / (ms / 1000) for n, ms in zip(expected, table.ms)])
    ref = table.ms.where(table.model == "parent").ffill()
    assert list(table.speedup) == pytest.approx(list(ref / table.ms))


def test_needs_a_model():
    with pytest.raises(ConfigError, match="at least one model"):
        measure_speed({}, SMALL)
