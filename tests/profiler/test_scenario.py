"""Serving scenarios: the ``PHASE[:batch=B,length=N]`` strings and the sizes a step implies."""

from __future__ import annotations

import pytest

import solvers
from puzzle.errors import ConfigError
from puzzle.profiler.scenario import Scenario, default_scenarios, parse_scenario
from solvers.errors import ProblemError


@pytest.mark.parametrize(
    ("text", "name", "phase", "batch", "length"),
    [
        ("decode", "decode", "decode", 8, 1024),  # the defaults
        ("prefill", "prefill", "prefill", 1, 1024),
        ("decode:batch=64,context=4096", "decode", "decode", 64, 4096),
        ("long=decode:batch=2,ctx=8192", "long", "decode", 2, 8192),
        ("prefill:batch=1,prompt=2048", "prefill", "prefill", 1, 2048),
        ("p2k=prefill:batch=4,prompt=2048", "p2k", "prefill", 4, 2048),
        ("decode:length=512", "decode", "decode", 8, 512),  # only one key: the other keeps its default
        ("decode:batch=3", "decode", "decode", 3, 1024),
        ("  DECODE : Batch = 16 , CONTEXT = 100 ", "decode", "decode", 16, 100),  # case and spaces
        ("short=decode", "short", "decode", 8, 1024),
    ],
)
def test_parse_scenario(text, name, phase, batch, length):
    sc = parse_scenario(text)
    assert (sc.name, sc.phase, sc.batch, sc.length, sc.replicas) == (name, phase, batch, length, 1)
    assert sc.column == f"{name}_ms"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("generate:batch=1", "start with one of"),  # unknown phase
        ("", "start with one of"),
        ("decode:batch=1,tokens=5", "unknown key 'tokens'"),
        ("decode:batch=many", "batch must be an integer, got 'many'"),
        ("decode:context=1.5", "context must be an integer"),
        ("decode:batch", "batch must be an integer"),  # a key without a value
        ("decode:batch=0", "scenario 'decode': batch must be >= 1, got 0"),  # the solvers' check, as ConfigError
        ("prefill:prompt=0", "scenario 'prefill': length must be >= 1, got 0"),
        ("decode:batch=-4", "batch must be >= 1"),
        ("decode:replicas=0", "replicas must be >= 1"),
        ("decode:replicas=two", "replicas must be an integer, got 'two'"),
        ("2long=decode", "must be an identifier"),  # the name heads a table column
    ],
)
def test_parse_scenario_errors_say_what_is_wrong(text, needle):
    with pytest.raises(ConfigError) as info:
        parse_scenario(text)
    assert needle in str(info.value)


def test_unknown_phase_message_shows_examples():
    with pytest.raises(ConfigError) as info:
        parse_scenario("warmup")
    message = str(info.value)
    assert "'warmup'" in message and "prefill" in message and "decode" in message
    assert "decode:batch=64,context=4096" in message


def test_tokens_and_attended_keys_of_each_phase():
    prefill = Scenario(name="p", phase="prefill", batch=4, length=512)
    assert (prefill.new_tokens, prefill.attended, prefill.tokens) == (512, 512, 4 * 512)
    # A decode step adds one token per sequence, which attends to the cache and to itself.
    decode = Scenario(name="d", phase="decode", batch=64, length=4096)
    assert (decode.new_tokens, decode.attended, decode.tokens) == (1, 4097, 64)


def test_the_profiler_and_the_mip_share_one_scenario_type():
    assert Scenario is solvers.Scenario
    sc = parse_scenario("long=decode:batch=64,context=8192,replicas=4")
    assert isinstance(sc, solvers.Scenario)
    assert (sc.name, sc.batch, sc.length, sc.replicas, sc.kv_tokens) == ("long", 64, 8192, 4, 8193)
    assert sc.describe() == "long: decode, batch 64, context 8192, 4 replicas"


def test_scenario_validates_itself():
    with pytest.raises(ProblemError, match="phase must be one of"):
        Scenario(name="x", phase="train", batch=1, length=1)
    with pytest.raises(ProblemError, match="length must be >= 1"):
        Scenario(name="x", phase="decode", batch=1, length=0)


def test_default_scenarios():
    got = {(s.name, s.phase, s.batch, s.length) for s in default_scenarios()}
    assert got == {("prefill", "prefill", 1, 1024), ("decode", "decode", 8, 1024)}


def test_describe_names_the_length_by_phase():
    assert parse_scenario("decode:batch=2,context=10").describe() == "decode: decode, batch 2, context 10"
    assert parse_scenario("p=prefill:prompt=7").describe() == "p: prefill, batch 1, prompt 7"
