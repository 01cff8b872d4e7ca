"""The fields of a model's ``config.json`` that puzzle reads, checked in one place before any is used.

    check_config_json(cfg, where="/models/x/config.json", kind="hf")
    # ConfigError: /models/x/config.json: hidden_size must be a positive integer, got '64'

A hand-edited or foreign ``config.json`` (a field missing, ``"64"`` for 64, a negative head count)
would otherwise surface far from its cause: a ``KeyError`` in the HF translation, a ``TypeError`` in a
parameter count, a search space with no variants. :func:`puzzle.loading.load_config` calls
:func:`check_config_json` on every source's dict first, so each of those is one line naming the
file, the field and the value. :data:`FIELDS` lists the fields and their types; the sizes that
must divide one another are checked after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from puzzle.errors import ConfigError

HF_KINDS = ("hf", "embedded")
"""Sources read as a homogeneous Hugging Face config (every size given once)."""
ALL_KINDS = ("hf", "embedded", "runtime", "decilm")

_KINDS = {
    "count": "a positive integer",
    "number": "a positive number",
    "flag": "true or false",
    "mapping": "a JSON object",
    "list": "a JSON list",
    "text": "a string",
}


@dataclass(frozen=True)
class Field:
    """One field of ``config.json`` that puzzle reads."""

    name: str
    kind: str
    """One of ``count``, ``number``, ``flag``, ``mapping``, ``list``, ``text`` (see ``_KINDS``)."""
    what: str
    """What it is, for the message when it is missing."""
    required: tuple[str, ...] = ()
    """The source kinds that must give it (not null); elsewhere it may be absent or null."""


FIELDS = (
    Field("vocab_size", "count", "the number of token embeddings", ALL_KINDS),
    Field("hidden_size", "count", "the width of the residual stream", ALL_KINDS),
    Field("num_attention_heads", "count", "the query heads of each layer", ALL_KINDS),
    Field("num_hidden_layers", "count", "the number of decoder layers", HF_KINDS),
    Field("intermediate_size", "count", "the FFN width", HF_KINDS),
    Field("num_key_value_heads", "count", "the KV heads of each layer"),
    Field("head_dim", "count", "the width of one attention head"),
    Field("max_position_embeddings", "count", "the longest sequence"),
    Field("rms_norm_eps", "number", "RMSNorm's epsilon"),
    Field("rope_theta", "number", "RoPE's base"),
    Field("rope_parameters", "mapping", "RoPE's settings"),
    Field("rope_scaling", "mapping", "RoPE's scaling"),
    Field("tie_word_embeddings", "flag", "whether the LM head is the embedding"),
    Field("attention_bias", "flag", "bias on the attention projections"),
    Field("qkv_bias", "flag", "bias on q, k and v"),
    Field("mlp_bias", "flag", "bias on the FFN projections"),
    Field("hidden_act", "text", "the FFN activation"),
    Field("block_configs", "list", "one block config per layer", ("runtime", "decilm")),
    Field("architectures", "list", "the model classes"),
)


def check_config_json(cfg: dict[str, Any], *, where: str, kind: str) -> None:
    """Raise :class:`ConfigError` naming ``where`` and the field when a field of :data:`FIELDS` is missing
    (for a source of ``kind`` that needs it) or of the wrong type, or when head counts do not divide."""
    for field in FIELDS:
        value = cfg.get(field.name)
        if value is None:
            if kind in field.required:
                raise ConfigError(f"{where}: {field.name} is missing; puzzle needs it ({field.what}, "
                                  f"{_KINDS[field.kind]})")
            continue
        if not _is(field.kind, value):
            raise ConfigError(f"{where}: {field.name} must be {_KINDS[field.kind]}, got {value!r}")
    heads, kv, hidden = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads"), cfg.get("hidden_size")
    if heads is None or hidden is None:
        return
    if cfg.get("head_dim") is None and hidden % heads:
        raise ConfigError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                          "and no head_dim is given")
    if kv is not None and heads % kv:
        raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")


def _is(kind: str, value: Any) -> bool:
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if kind == "flag":
        return isinstance(value, bool)
    if kind == "mapping":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    return isinstance(value, str)
