"""An architecture carved out of a model without a block library: sub-blocks kept or removed.

``derive_model(model, blocks)`` takes, layer by layer, each sub-block either as the model has it
or as ``no_op`` (removing attention from layers 14-25 by hand, say). Any other variant needs
weights from a block library (``Library.assemble``); asking for one here is a :class:`ConfigError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from puzzle.errors import ConfigError
from puzzle.model import PuzzleForCausalLM
from puzzle.model.weights import model_from_state_dict
from puzzle.schema import AttentionConfig, BlockConfig

_SUB = {"attention": ("self_attn.", "input_layernorm."), "ffn": ("mlp.", "post_attention_layernorm.")}


def derive_model(model: PuzzleForCausalLM, blocks: Sequence[BlockConfig]) -> PuzzleForCausalLM:
    """A new model with ``blocks``; every sub-block must be the model's own or ``no_op``."""
    have = model.config.blocks
    if len(blocks) != len(have):
        raise ConfigError(f"the architecture has {len(blocks)} layers but the model has {len(have)}")
    drop: list[str] = []
    for i, (want, old) in enumerate(zip(blocks, have)):
        for sub in ("attention", "ffn"):
            w, o = getattr(want, sub), getattr(old, sub)
            if w == o:
                continue
            if w.kind != "no_op":
                raise ConfigError(f"layer {i}: {sub} {w.label} is neither the model's own ({o.label}) nor no_op; "
                                  f"other variants need trained weights: pass a block library (--library)")
            drop += [f"model.layers.{i}.{prefix}" for prefix in _SUB[sub]]
    # Copies: the derived model shares no tensor with ``model`` (training it never moves the parent).
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(tuple(drop))}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dtype = next(model.parameters()).dtype
    return model_from_state_dict(model.config.with_blocks(list(blocks)), state, dtype=dtype)


def without_attention(blocks: Sequence[BlockConfig], layers: Iterable[int]) -> list[BlockConfig]:
    """``blocks`` with the attention of ``layers`` set to ``no_op``."""
    layers = set(layers)
    bad = sorted(i for i in layers if not 0 <= i < len(blocks))
    if bad:
        raise ConfigError(f"layers {bad} do not exist; the model has layers 0-{len(blocks) - 1}")
    return [BlockConfig(attention=AttentionConfig.no_op(), ffn=b.ffn) if i in layers else b
            for i, b in enumerate(blocks)]
