"""How the model is served: one prefill or one decode step, at a batch size and a length, on replicas.

* ``prefill``: ``batch`` prompts of ``length`` tokens each go through the model at once (causal
  attention over the prompt; the KV cache is written).
* ``decode``: ``batch`` sequences each add one token, attending to ``length`` tokens of KV cache and
  to itself (the cache is read whole every step).
* ``replicas`` copies of the model serve side by side on the target (each on its own devices, e.g.
  4 copies on an 8-GPU node at tensor parallelism 2): they multiply throughput, not memory per device.

The one type both the profiler (which prices one step of one replica) and the MIP (which budgets
memory and throughput) read. What a step implies, per replica::

    new_tokens = length (prefill) | 1 (decode)          tokens each sequence adds
    attended   = length (prefill) | length + 1 (decode) keys each new token attends to at most
    tokens     = batch * new_tokens                     tokens the step processes
    kv_tokens  = length (prefill) | length + 1 (decode) tokens each sequence holds in the KV cache
                                                        at the end of the step (= attended)

and what the MIP makes of it (``solvers.problem``)::

    KV cache bytes per device = kv_bytes_per_token * batch * kv_tokens
    throughput (tokens/s)     = replicas * batch * new_tokens * 1000 / step_ms

This module never imports torch or puzzle; the profiler re-exports it and parses the text form
(``puzzle.profiler.scenario.parse_scenario``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from solvers.errors import ProblemError

PHASES = ("prefill", "decode")
_INT_FIELDS = ("batch", "length", "replicas")


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One serving step: a phase, a batch of sequences, a length, and how many model copies serve."""

    name: str = "decode"
    """Cost column stem: ``<name>_ms`` (or ``<name>`` itself if the costs have such a column)."""
    phase: str = "decode"
    """``prefill`` or ``decode``."""
    batch: int = 1
    """Sequences per step, per replica."""
    length: int = 1024
    """Prompt tokens (prefill) or tokens already in the KV cache (decode)."""
    replicas: int = 1
    """Model copies serving side by side on the target: throughput of the target = replicas x one copy's."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z_]\w*", self.name):
            raise ProblemError(f"scenario name {self.name!r} must be an identifier (it names the cost column "
                               f"<name>_ms)")
        if self.phase not in PHASES:
            raise ProblemError(f"scenario {self.name!r}: phase must be one of {PHASES}, got {self.phase!r}")
        for key in _INT_FIELDS:
            value = getattr(self, key)
            try:
                number = operator.index(value)  # int, numpy int; not float, str or bool
            except TypeError:
                number = None
            if number is None or isinstance(value, bool):
                raise ProblemError(f"scenario {self.name!r}: {key} must be an integer, got {value!r}")
            if number < 1:
                raise ProblemError(f"scenario {self.name!r}: {key} must be >= 1, got {number}")
            object.__setattr__(self, key, int(number))

    # -- sizes of one step of one replica ------------------------------------------------------------
    @property
    def new_tokens(self) -> int:
        """Tokens each sequence adds in this step (T): the prompt, or one."""
        return self.length if self.phase == "prefill" else 1

    @property
    def attended(self) -> int:
        """Keys each new token attends to at most (S): the prompt, or the cache plus itself."""
        return self.length if self.phase == "prefill" else self.length + 1

    @property
    def tokens(self) -> int:
        """Tokens one replica processes per step: batch x new tokens."""
        return self.batch * self.new_tokens

    @property
    def kv_tokens(self) -> int:
        """Tokens each sequence holds in the KV cache at the end of the step: the prompt (prefill), or
        the cache plus the new token (decode), i.e. :attr:`attended`. Memory budgets count
        ``batch * kv_tokens`` tokens per device."""
        return self.attended

    @property
    def cache_tokens(self) -> int:
        """KV-cache tokens one replica holds (on each of its devices): batch x kv tokens."""
        return self.batch * self.kv_tokens

    # -- the whole target ----------------------------------------------------------------------------
    @property
    def node_tokens(self) -> int:
        """Tokens the whole target processes per step: replicas x batch x new tokens."""
        return self.replicas * self.tokens

    def throughput(self, step_ms: float) -> float:
        """Tokens/s of the whole target at a step time of ``step_ms`` (``inf`` for a step of 0 ms)."""
        return self.node_tokens * 1000.0 / step_ms if step_ms > 0 else math.inf

    def max_step_ms(self, throughput: float) -> float:
        """The longest step time that still reaches ``throughput`` tokens/s (inverse of :meth:`throughput`)."""
        if throughput <= 0:
            raise ProblemError(f"throughput target must be positive, got {throughput}")
        return self.node_tokens * 1000.0 / throughput

    # -- names and serialization ---------------------------------------------------------------------
    @property
    def column(self) -> str:
        return f"{self.name}_ms"

    def describe(self) -> str:
        """``decode: decode, batch 64, context 4096`` (``, 4 replicas`` appended when there are several)."""
        what = "prompt" if self.phase == "prefill" else "context"
        out = f"{self.name}: {self.phase}, batch {self.batch}, {what} {self.length}"
        return out + (f", {self.replicas} replicas" if self.replicas > 1 else "")

    def to_dict(self) -> dict[str, Any]:
        """The fields (``name, phase, batch, length, replicas``), JSON-ready; :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scenario:
        """A scenario from :meth:`to_dict`'s mapping; absent fields take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProblemError(f"scenario: unknown field(s) {unknown}; the fields are {sorted(known)}")
        return cls(**dict(data))
