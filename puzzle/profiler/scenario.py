"""Serving scenarios: one prefill or one decode step at a batch size and a length.

* ``prefill``: ``batch`` prompts of ``length`` tokens each go through the model at once
  (causal attention over the prompt; the KV cache is written).
* ``decode``: ``batch`` sequences each add one token, attending to ``length`` tokens of KV cache
  (the cache is read whole every step).

Written as ``PHASE[:batch=B,length=N]`` (``length`` may also be spelled ``prompt`` or
``context``), optionally named: ``long=decode:batch=64,context=8192``. The cost table gets one
``<name>_ms`` column per scenario.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from puzzle.errors import ConfigError

PHASES = ("prefill", "decode")
DEFAULTS = {"prefill": (1, 1024), "decode": (8, 1024)}
_LENGTH_KEYS = ("length", "prompt", "context", "ctx")


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One serving step."""

    name: str
    """Column stem: the cost table gets ``<name>_ms``."""
    phase: str
    """``prefill`` or ``decode``."""
    batch: int
    """Sequences in the batch."""
    length: int
    """Prompt tokens (prefill) or tokens already in the KV cache (decode)."""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ConfigError(f"scenario {self.name!r}: phase must be one of {PHASES}, got {self.phase!r}")
        if self.batch < 1 or self.length < 1:
            raise ConfigError(f"scenario {self.name!r}: batch and length must be >= 1, got {self.batch}, {self.length}")
        if not re.fullmatch(r"[A-Za-z_]\w*", self.name):
            raise ConfigError(f"scenario name {self.name!r} must be an identifier (it names a table column)")

    @property
    def new_tokens(self) -> int:
        """Tokens each sequence adds in this step (T): the prompt, or one."""
        return self.length if self.phase == "prefill" else 1

    @property
    def context(self) -> int:
        """Keys each new token attends to at most (S): the prompt, or the cache plus itself."""
        return self.length if self.phase == "prefill" else self.length + 1

    @property
    def tokens(self) -> int:
        """Tokens the step produces or consumes: batch x new tokens."""
        return self.batch * self.new_tokens

    @property
    def column(self) -> str:
        return f"{self.name}_ms"

    def describe(self) -> str:
        what = "prompt" if self.phase == "prefill" else "context"
        return f"{self.name}: {self.phase}, batch {self.batch}, {what} {self.length}"


def parse_scenario(text: str) -> Scenario:
    """``"decode"``, ``"decode:batch=64,context=4096"``, ``"p2k=prefill:batch=1,prompt=2048"``."""
    name, _, rest = text.strip().partition("=") if "=" in text.split(":")[0] else ("", "", text.strip())
    phase, _, args = rest.partition(":")
    phase = phase.strip().lower()
    if phase not in PHASES:
        raise ConfigError(f"cannot read scenario {text!r}: start with one of {PHASES}, "
                          f"e.g. 'decode:batch=64,context=4096' or 'prefill:batch=1,prompt=2048'")
    batch, length = DEFAULTS[phase]
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, _, value = item.partition("=")
        key = key.strip().lower()
        if key != "batch" and key not in _LENGTH_KEYS:
            raise ConfigError(f"scenario {text!r}: unknown key {key!r}; use batch and one of {_LENGTH_KEYS}")
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"scenario {text!r}: {key} must be an integer, got {value!r}") from None
        if key == "batch":
            batch = number
        else:
            length = number
    return Scenario(name=name.strip() or phase, phase=phase, batch=batch, length=length)


def default_scenarios() -> list[Scenario]:
    """``prefill`` (batch 1, prompt 1024) and ``decode`` (batch 8, context 1024)."""
    return [Scenario(name=p, phase=p, batch=b, length=n) for p, (b, n) in DEFAULTS.items()]
