"""Keep a MIP to what an engine loads: drop the candidates it cannot (the parent's always stay).

    problem = engine_problem(problem, engine_rules("vllm"))   # no linear sub-blocks, layer 0 attends, ...
"""

from __future__ import annotations

from typing import Any

from puzzle.engines.check import allowed, block_problems
from puzzle.engines.rules import EngineRules
from puzzle.errors import EngineError
from puzzle.schema import BlockConfig


def _block(label: str) -> BlockConfig:
    from solvers.labels import block_dict

    return BlockConfig.from_dict(block_dict(label))


def engine_problem(problem: Any, rules: EngineRules) -> Any:
    """``problem`` (a :class:`solvers.Problem`) without the candidates ``rules``' engine cannot load.

    A candidate stays when every layer it covers holds a block :func:`puzzle.engines.allowed` at that
    layer (KV heads judged against the parent's candidate there, where the tables mark one with
    ``is_parent``); so any choice of the rest loads. A parent block the engine cannot load is an
    :class:`EngineError`: the MIP may keep it anywhere.
    """
    if rules.name == "transformers":  # it loads every block
        return problem
    parent: dict[int, BlockConfig] = {}
    for c in problem.candidates:
        if c.is_parent and len(c.layers) == 1:
            parent[c.layers[0]] = block = _block(c.members[0])
            problems = block_problems(rules, block)
            if problems:
                raise EngineError(f"{rules.title} cannot load the parent's own layer {c.layers[0]}: {problems[0]}; the "
                                  f"MIP may keep it, so choose another --engine (transformers loads any)")

    def kv(layer: int) -> int | None:
        return parent[layer].attention.num_key_value_heads if layer in parent else None

    def ok(c: Any) -> bool:
        return c.is_parent or all(allowed(rules, layer, _block(label), parent_kv_heads=kv(layer))
                                  for layer, label in zip(c.layers, c.members))

    return problem.replace(candidates=tuple(c for c in problem.candidates if ok(c)))
