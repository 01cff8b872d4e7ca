"""Refuse the values of a search space that produce no variant, before a search writes anything.

    check_space(plan)      # ConfigError: "--space ffn.sizes [0.3]: 0.3 x 96 rounds to 256 with multiple 256, ..."

A space rounds its FFN sizes to ``multiple`` and drops a width that reaches the parent's, and the
serving engine (:mod:`puzzle.engines`) drops what its loader cannot build (with vLLM, widths that are
not multiples of 256). Silently, a value the user wrote would then leave the library without the
variant it asked for: on a parent 96 wide, ``sizes: [0.3]`` rounds to 256 and gives no pruned FFN.
So every value the user wrote (FFN sizes or multiple, explicit KV-head counts, the variants an
override lists) must give a variant on some layer; the first that gives none is refused, in one line
naming what it rounds to, why that is dropped, and what to choose instead. The space's defaults are
not checked: a small parent legitimately has fewer widths than the default ratios name.
This module imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from block_library.space import AttentionSpace, FFNSpace, SearchSpace, parse_variant
from puzzle.engines import attention_refusal, engine_rules, ffn_refusal
from puzzle.engines.rules import EngineRules
from puzzle.errors import ConfigError
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig


def check_space(plan: Any) -> None:
    """Refuse a value of ``plan``'s ``space`` setting that produces no variant (:class:`ConfigError`, one line).

    ``plan`` is a :class:`puzzle.search.plan.Plan`: its ``space`` setting (what the user wrote, or None),
    its engine and its parent's blocks. Writes nothing; preflight calls it before the run directory is touched.
    """
    given = plan.value("space")
    if not given:
        return
    name = "--space" if plan.settings["space"].source == "flag" else "space"
    check_values(given, plan.parent_config.blocks, engine=plan.engine, name=name)


def check_values(given: Mapping[str, Any], parent_blocks: Sequence[BlockConfig], *, engine: str | None,
                 name: str = "space") -> None:
    """Refuse the first value of the space mapping ``given`` that gives no variant on any of ``parent_blocks``
    once rounded and kept to what ``engine`` loads (None: every variant loads). ``name`` starts the message."""
    space = SearchSpace.from_dict(given)
    rules = engine_rules(engine) if engine is not None else None
    ffn_given = given.get("ffn") or {}
    if "sizes" in ffn_given or "multiple" in ffn_given:  # the defaults' sizes under the user's multiple count
        what = f"{name} ffn.sizes {list(space.ffn.sizes)}" if "sizes" in ffn_given else \
            f"{name} ffn.multiple {space.ffn.multiple}"
        _check_sizes(space.ffn, parent_blocks, rules, what)
    if not isinstance(space.attention.kv_heads, str):
        _check_kv_heads(space.attention, parent_blocks, rules, name)
    for o in space.overrides:
        _check_override(o.layers, o.attention, o.ffn, parent_blocks, rules, name)


def _check_sizes(ffn: FFNSpace, parent_blocks: Sequence[BlockConfig], rules: EngineRules | None, what: str) -> None:
    """Every size gives, on some SwiGLU layer, a width below the parent's that the engine loads; ``what`` names
    the value the user wrote."""
    widths = sorted({b.ffn.intermediate_size for b in parent_blocks if b.ffn.kind == "swiglu"}, reverse=True)

    def kept(size: float | int, parent_width: int) -> bool:
        m = ffn.width(size, parent_width)
        return m < parent_width and (rules is None or ffn_refusal(rules, FFNConfig.swiglu(m)) is None)

    for size in ffn.sizes:
        if widths and not any(kept(size, w) for w in widths):
            w = widths[0]  # the widest parent layer: the most room below it
            m = ffn.width(size, w)
            raw = f"{size} x {w}" if isinstance(size, float) else f"{size}"
            why = f"{raw} rounds to {m} with multiple {ffn.multiple}"
            if m >= w:
                why += f", not below the parent's FFN width {w}"
            elif rules is not None:  # a width below the parent's is only dropped by an engine's ffn_mult rule
                why += f", and {rules.title} loads only FFN widths that are multiples of {rules.ffn_multiple} " \
                       "(ffn_mult)"
            raise ConfigError(f"{what}: {why}: no pruned width; {_width_choice(w, ffn.multiple, rules)}")


def _width_choice(parent_width: int, multiple: int, rules: EngineRules | None) -> str:
    """What to choose instead: the widths that survive, or the setting that makes some survive."""
    em = rules.ffn_multiple if rules is not None else None
    step = math.lcm(multiple, em or 1)
    loadable = list(range(step * ((parent_width - 1) // step), 0, -step))
    if loadable:
        shown = ", ".join(str(m) for m in loadable[:4]) + (", ..." if len(loadable) > 4 else "")
        hint = f" (ffn.multiple: {step})" if step != multiple else ""
        return f"choose sizes that round to {shown}{hint}"
    if rules is not None and em is not None and em >= parent_width:
        return (f"no multiple of {em} is below {parent_width}: choose --engine transformers (any width) "
                "or drop ffn.sizes")
    smaller = 2 ** int(math.log2(max(1, parent_width // 4)))
    return f"no multiple of {multiple} is below {parent_width}: set ffn.multiple below it, e.g. multiple: {smaller}"


def _check_kv_heads(attention: AttentionSpace, parent_blocks: Sequence[BlockConfig], rules: EngineRules | None,
                    name: str) -> None:
    """Every explicit KV-head count is offered on some GQA layer (the engine may hold it to the parent's)."""
    if rules is None:
        return
    gqa = [(i, b.attention.num_key_value_heads) for i, b in enumerate(parent_blocks) if b.attention.kind == "gqa"]
    for k in attention.kv_heads:
        reasons = [attention_refusal(rules, i, AttentionConfig.gqa(k), parent_kv_heads=kv) for i, kv in gqa]
        if gqa and all(reasons):
            raise ConfigError(f"{name} attention.kv_heads {list(attention.kv_heads)}: {rules.title} does not load "
                              f"gqa:{k} ({reasons[0]}): no variant; drop it or choose another --engine")


def _check_override(layers: Sequence[int], attention: Sequence[str] | None, ffn: Sequence[str] | None,
                    parent_blocks: Sequence[BlockConfig], rules: EngineRules | None, name: str) -> None:
    """Every variant an override lists loads in the engine on one of its layers."""
    if rules is None:
        return
    layers = [i for i in layers if 0 <= i < len(parent_blocks)]  # out of range: layer_variants says so
    for text in attention or ():
        a = parse_variant(text, "attention")
        if isinstance(a, AttentionConfig):  # the parent's own sub-block always stays
            reasons = [None if a == parent_blocks[i].attention else
                       attention_refusal(rules, i, a, parent_kv_heads=parent_blocks[i].attention.num_key_value_heads)
                       for i in layers]
            if layers and all(reasons):
                _refuse_override(name, layers, text, rules, reasons[0])
    for text in ffn or ():
        f = parse_variant(text, "ffn")
        if isinstance(f, FFNConfig):
            reasons = [None if f == parent_blocks[i].ffn else ffn_refusal(rules, f) for i in layers]
            if layers and all(reasons):
                _refuse_override(name, layers, text, rules, reasons[0])


def _refuse_override(name: str, layers: Sequence[int], text: str, rules: EngineRules, reason: str | None) -> None:
    raise ConfigError(f"{name} overrides layers {list(layers)}: {rules.title} does not load {text} there ({reason}): "
                      f"no variant; drop it or choose another --engine")
