"""Keep a MIP to what an engine loads: drop the candidates it cannot (the parent's always stay).

    problem = engine_problem(problem, engine_rules("vllm"))   # no linear sub-blocks, layer 0 attends, ...
"""

from __future__ import annotations

from typing import Any

from puzzle.engines.check import allowed
from puzzle.engines.rules import EngineRules
from puzzle.schema import BlockConfig


def _block(label: str) -> BlockConfig:
    from solvers.labels import block_dict

    return BlockConfig.from_dict(block_dict(label))


def engine_problem(problem: Any, rules: EngineRules) -> Any:
    """``problem`` (a :class:`solvers.Problem`) without the candidates ``rules``' engine cannot load.

    A candidate stays when every layer it covers holds a block :func:`puzzle.engines.allowed` at that
    layer (KV heads judged against the parent's candidate there); so any choice of the rest loads.
    """
    parent = {problem.candidates[i].layers[0]: _block(problem.candidates[i].members[0]) for i in problem.parent}

    def ok(c: Any) -> bool:
        return c.is_parent or all(
            allowed(rules, layer, _block(label), parent_kv_heads=parent[layer].attention.num_key_value_heads)
            for layer, label in zip(c.layers, c.members))

    return problem.replace(candidates=tuple(c for c in problem.candidates if ok(c)))
