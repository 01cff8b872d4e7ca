"""Apply an engine's rules to an architecture: which layers break them, and which variants to offer.

    violations(engine_rules("vllm"), blocks, config)    # [Violation(layer=15, rule="linear attention ...")]
    loaders(blocks, config)                              # ["trtllm", "llamacpp", "transformers"]
    allowed(engine_rules("sglang"), 3, block, parent_kv_heads=3)

``config`` is anything with the model's ``hidden_size``, ``num_attention_heads``, ``head_dim``,
``attention_bias`` and ``mlp_bias`` (a :class:`puzzle.model.PuzzleConfig`). No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from puzzle.engines.rules import ENGINES, EngineRules
from puzzle.errors import EngineError
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig


@dataclass(frozen=True)
class Violation:
    layer: int | None
    """The layer that breaks the rule; None for a model-wide rule."""
    rule: str

    def __str__(self) -> str:
        return self.rule if self.layer is None else f"layer {self.layer}: {self.rule}"


def _attention_rules(rules: EngineRules, a: AttentionConfig) -> list[str]:
    if a.kind == "linear" and not rules.linear_attention:
        return ["linear attention (replace_with_linear)"]
    if a.kind == "no_op" and not rules.no_op_attention:
        return ["no-op attention"]
    return []


def _ffn_rules(rules: EngineRules, f: FFNConfig) -> list[str]:
    if f.kind == "linear" and not rules.linear_ffn:
        return ["linear FFN (replace_with_linear)"]
    if f.kind == "no_op" and not rules.no_op_ffn:
        return ["no-op FFN"]
    if f.kind == "swiglu" and rules.ffn_multiple and f.intermediate_size % rules.ffn_multiple:
        return [f"FFN width {f.intermediate_size} is not a multiple of {rules.ffn_multiple} (ffn_mult cannot express it)"]
    return []


def block_problems(rules: EngineRules, block: BlockConfig) -> list[str]:
    """The rules of ``rules`` that one block breaks on its own, in words (empty: it loads)."""
    a, f = block.attention, block.ffn
    out = _attention_rules(rules, a) + _ffn_rules(rules, f)
    if f.kind == "no_op" and a.kind != "no_op" and rules.no_op_ffn_needs_no_op_attention:
        out.append(f"no-op FFN under {a.label} attention (the layer's attention output would be dropped)")
    return out


def attention_refusal(rules: EngineRules, layer: int, a: AttentionConfig, *, parent_kv_heads: int | None) -> str | None:
    """Why a search may not offer attention ``a`` at ``layer``, in words; None: it may.

    Judged on the sub-block alone, and stricter than :func:`violations` where a rule spans layers:
    layer 0 keeps real attention when the first real layer must attend, and (without variable KV
    heads) every attention keeps the parent's KV-head count, so any combination of allowed blocks
    is loadable.
    """
    found = _attention_rules(rules, a)
    if found:
        return found[0]
    if rules.first_real_layer_attends and layer == 0 and a.kind == "no_op":
        return "no-op attention in layer 0, where the engine's residual stream starts at an attention"
    if not rules.variable_kv_heads and a.kind == "gqa" and parent_kv_heads is not None \
            and a.num_key_value_heads != parent_kv_heads:
        return (f"{a.num_key_value_heads} KV heads where the parent has {parent_kv_heads}: every attention layer "
                f"keeps one KV-head count, no variable GQA")
    return None


def allowed_attention(rules: EngineRules, layer: int, a: AttentionConfig, *, parent_kv_heads: int | None) -> bool:
    """Whether a search may offer attention ``a`` at ``layer`` (:func:`attention_refusal` has no reason)."""
    return attention_refusal(rules, layer, a, parent_kv_heads=parent_kv_heads) is None


def ffn_refusal(rules: EngineRules, f: FFNConfig) -> str | None:
    """Why a search may not offer FFN ``f``, in words; None: it may (a no-op FFN that needs no-op
    attention is judged per block)."""
    found = _ffn_rules(rules, f)
    return found[0] if found else None


def allowed_ffn(rules: EngineRules, f: FFNConfig) -> bool:
    """Whether a search may offer FFN ``f`` (:func:`ffn_refusal` has no reason)."""
    return ffn_refusal(rules, f) is None


def allowed(rules: EngineRules, layer: int, block: BlockConfig, *, parent_kv_heads: int | None) -> bool:
    """Whether a search may put ``block`` at ``layer``: both sub-blocks allowed, and the pair too."""
    return (allowed_attention(rules, layer, block.attention, parent_kv_heads=parent_kv_heads)
            and allowed_ffn(rules, block.ffn) and not block_problems(rules, block))


def violations(rules: EngineRules, blocks: Sequence[BlockConfig], config: Any) -> list[Violation]:
    """Every rule of ``rules`` that the architecture breaks, layer by layer (empty: it loads)."""
    out: list[Violation] = []
    if not rules.biases and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        out.append(Violation(None, "attention / MLP biases (the engine builds its layers with bias=False)"))
    if rules.standard_head_dim and config.head_dim * config.num_attention_heads != config.hidden_size:
        out.append(Violation(None, f"head_dim {config.head_dim} != hidden_size / num_attention_heads "
                                   f"({config.hidden_size} / {config.num_attention_heads})"))
    for i, block in enumerate(blocks):
        out += [Violation(i, r) for r in block_problems(rules, block)]
    if rules.first_real_layer_attends:
        first = next((i for i, b in enumerate(blocks) if not (b.attention.kind == "no_op" and b.ffn.kind == "no_op")), None)
        if first is not None and blocks[first].attention.kind == "no_op":
            out.append(Violation(first, "the first layer that is not wholly no-op has no attention "
                                        "(the engine's residual stream starts at an attention)"))
    if not rules.variable_kv_heads:
        kv = sorted({b.attention.num_key_value_heads for b in blocks if b.attention.kind == "gqa"})
        if len(kv) > 1:
            out.append(Violation(None, f"attention layers with different KV-head counts {kv} (variable GQA)"))
    return out


def loaders(blocks: Sequence[BlockConfig], config: Any) -> list[str]:
    """The engines (``--engine`` names) whose loaders take this architecture."""
    return [name for name, rules in ENGINES.items() if not violations(rules, blocks, config)]


def check_loadable(rules: EngineRules, blocks: Sequence[BlockConfig], config: Any, *, what: str = "this model") -> None:
    """Raise :class:`EngineError` naming the layers and rules when ``rules``' engine cannot load it."""
    found = violations(rules, blocks, config)
    if found:
        shown = "; ".join(str(v) for v in found[:6]) + ("; ..." if len(found) > 6 else "")
        others = loaders(blocks, config)
        hint = f"--engine {others[0]} loads it" if others else "no engine loads it"
        raise EngineError(f"{rules.title} cannot load {what}: {shown} (rule read from {rules.source}); "
                          f"search again with --engine {rules.name}, or {hint}")
