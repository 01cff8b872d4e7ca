"""A verified solution: the chosen candidates, their totals, and each constraint's slack.

``to_dict`` is the JSON ``puzzle solve`` writes::

    {
      "block_configs": [{"attention": {"kind": "gqa", "num_key_value_heads": 8},
                         "ffn": {"kind": "swiglu", "intermediate_size": 14336}}, ...],   one per layer
      "chosen": {"0": "gqa:8|swiglu:14336", ...},          layer -> block label
      "candidates": [{"id": ..., "layers": [0], "variant": ..., "score": ...}, ...],
      "fused": [{"id": ..., "layers": [4, 5, 6, 7], "variants": [...]}],   multi-layer candidates
      "objective": 0.123, "score_column": "kl",
      "totals": {"memory_bytes", "memory_gib", "params", "step_ms", "throughput", "speedup", ...},
      "constraints": [{"name", "value", "sense", "target", "slack"}, ...],
      "scenario": {"name", "phase", "batch", "length", "replicas"}, "backend", "status", "gap", "seconds"
    }

``block_configs`` has one entry per layer, so ``puzzle.schema.load_blocks`` reads the file as it
is. A multi-layer candidate contributes its member blocks there and is listed under ``fused``
(how a fused run is built is the fusion stage's business).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from solvers.constraints import Check, format_bytes
from solvers.labels import block_dict
from solvers.problem import Candidate, Problem, Totals


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass(frozen=True, eq=False)
class Solution:
    problem: Problem
    chosen: tuple[int, ...]
    """Indices into ``problem.candidates``, in layer order."""
    totals: Totals
    checks: tuple[Check, ...]
    backend: str
    status: str
    """``optimal`` (proven) or ``feasible`` (a solver stopped early with a verified solution)."""
    gap: float
    seconds: float

    @property
    def objective(self) -> float:
        return self.totals.objective

    @property
    def candidates(self) -> list[Candidate]:
        return [self.problem.candidates[i] for i in self.chosen]

    def layer_labels(self) -> list[str]:
        """The block label of every layer, 0 .. num_layers - 1."""
        out = [""] * self.problem.num_layers
        for c in self.candidates:
            for layer, label in zip(c.layers, c.members, strict=True):
                out[layer] = label
        return out

    def block_configs(self) -> list[dict[str, Any]]:
        return [block_dict(label) for label in self.layer_labels()]

    def to_dict(self) -> dict[str, Any]:
        p = self.problem
        return _clean({
            "block_configs": self.block_configs(),
            "chosen": {str(i): label for i, label in enumerate(self.layer_labels())},
            "candidates": [{"id": c.id, "layers": list(c.layers), "variant": c.variant,
                            "score": c.scores[p.score_column]} for c in self.candidates],
            "fused": [{"id": c.id, "layers": list(c.layers), "variants": list(c.members)}
                      for c in self.candidates if len(c.layers) > 1],
            "objective": self.objective,
            "score_column": p.score_column,
            "totals": self.totals.to_dict(),
            "constraints": [{"name": c.name, "value": c.value, "sense": c.sense, "target": c.target,
                             "slack": c.slack} for c in self.checks],
            "scenario": p.scenario.to_dict(),
            "backend": self.backend,
            "status": self.status,
            "gap": self.gap,
            "seconds": self.seconds,
        })

    def summary(self) -> str:
        """A few lines for a terminal: objective, totals, and the constraints' slack."""
        t = self.totals
        lines = [f"{self.backend}: {self.status}, objective ({self.problem.score_column}) {self.objective:.6g}, "
                 f"gap {self.gap:.3g}, {self.seconds:.2f} s"]
        parts = []
        if t.memory_bytes is not None:
            parts.append(f"memory {format_bytes(t.memory_bytes)}")
        if t.params is not None:
            parts.append(f"params {t.params / 1e9:.4f}B" if t.params >= 1e8 else f"params {t.params:g}")
        if t.step_ms is not None:
            parts.append(f"step {t.step_ms:.4g} ms, {t.throughput:.6g} tokens/s")
        if t.speedup is not None:
            parts.append(f"speedup {t.speedup:.4f}x")
        lines.append(", ".join(parts))
        lines += [f"  {c.name}: {c.shown} (slack {c.shown_slack})" for c in self.checks]
        return "\n".join(lines)
