"""Serving scenarios as text: ``PHASE[:batch=B,length=N,replicas=R]``.

The scenario type itself is :class:`solvers.scenario.Scenario`, re-exported here: the profiler
prices one step of one replica with it and the MIP budgets memory and throughput with the same
object. ``length`` may also be spelled ``prompt`` or ``context``; a scenario may be named:
``long=decode:batch=64,context=8192``. The cost table gets one ``<name>_ms`` column per scenario.
"""

from __future__ import annotations

from puzzle.errors import ConfigError
from solvers.errors import ProblemError
from solvers.scenario import PHASES, Scenario

__all__ = ["DEFAULTS", "PHASES", "Scenario", "default_scenarios", "parse_scenario"]

DEFAULTS = {"prefill": (1, 1024), "decode": (8, 1024)}
_LENGTH_KEYS = ("length", "prompt", "context", "ctx")
_KEYS = ("batch", *_LENGTH_KEYS, "replicas")


def parse_scenario(text: str) -> Scenario:
    """``"decode"``, ``"decode:batch=64,context=4096"``, ``"p2k=prefill:batch=1,prompt=2048,replicas=4"``."""
    name, _, rest = text.strip().partition("=") if "=" in text.split(":")[0] else ("", "", text.strip())
    phase, _, args = rest.partition(":")
    phase = phase.strip().lower()
    if phase not in PHASES:
        raise ConfigError(f"cannot read scenario {text!r}: start with one of {PHASES}, "
                          f"e.g. 'decode:batch=64,context=4096' or 'prefill:batch=1,prompt=2048'")
    batch, length = DEFAULTS[phase]
    values = {"batch": batch, "length": length, "replicas": 1}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, _, value = item.partition("=")
        key = key.strip().lower()
        if key not in _KEYS:
            raise ConfigError(f"scenario {text!r}: unknown key {key!r}; use batch, replicas and one of "
                              f"{_LENGTH_KEYS}")
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"scenario {text!r}: {key} must be an integer, got {value!r}") from None
        values["length" if key in _LENGTH_KEYS else key] = number
    try:
        return Scenario(name=name.strip() or phase, phase=phase, **values)
    except ProblemError as e:
        raise ConfigError(str(e)) from e


def default_scenarios() -> list[Scenario]:
    """``prefill`` (batch 1, prompt 1024) and ``decode`` (batch 8, context 1024)."""
    return [Scenario(name=p, phase=p, batch=b, length=n) for p, (b, n) in DEFAULTS.items()]
