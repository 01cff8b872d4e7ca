"""Block labels: the short names of block variants, and what they mean.

A block label is ``ATTENTION|FFN`` where ATTENTION is ``gqa:K`` (grouped-query attention with K
key-value heads), ``linear`` or ``no_op``, and FFN is ``swiglu:M`` (gated MLP of width M),
``linear`` or ``no_op``; e.g. ``gqa:3|swiglu:1536`` or ``no_op|linear``. These are the labels of
``puzzle.schema.BlockConfig`` (duplicated here because ``solvers`` must not import ``puzzle``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from solvers.errors import ProblemError

_ATTENTION = re.compile(r"^(?:gqa:(?P<k>[1-9]\d*)|linear|no_op)$")
_FFN = re.compile(r"^(?:swiglu:(?P<m>[1-9]\d*)|linear|no_op)$")


@lru_cache(maxsize=4096)
def parse_label(label: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``"gqa:3|swiglu:1536"`` -> ``({"kind": "gqa", "num_key_value_heads": 3}, {"kind": "swiglu", ...})``.

    Raises :class:`ProblemError` naming the accepted forms. Callers must not mutate the result.
    """
    parts = label.split("|")
    attn = _ATTENTION.match(parts[0].strip()) if len(parts) == 2 else None
    ffn = _FFN.match(parts[1].strip()) if len(parts) == 2 else None
    if attn is None or ffn is None:
        raise ProblemError(
            f"block label {label!r} is not ATTENTION|FFN with ATTENTION one of gqa:K, linear, no_op "
            f"and FFN one of swiglu:M, linear, no_op (e.g. 'gqa:8|swiglu:14336')"
        )
    a: dict[str, Any] = {"kind": attn.group(0).split(":")[0]}
    if attn.group("k"):
        a["num_key_value_heads"] = int(attn.group("k"))
    f: dict[str, Any] = {"kind": ffn.group(0).split(":")[0]}
    if ffn.group("m"):
        f["intermediate_size"] = int(ffn.group("m"))
    return a, f


def block_dict(label: str) -> dict[str, Any]:
    """The per-layer block config dict of ``puzzle.schema.BlockConfig.to_dict`` for a label."""
    a, f = parse_label(label)
    return {"attention": dict(a), "ffn": dict(f)}


@lru_cache(maxsize=4096)
def label_attributes(label: str) -> dict[str, Any]:
    """The attributes custom constraints can test, derived from a label.

    ``variant`` (the label), ``attention`` / ``ffn`` (its halves), ``attention_kind`` /
    ``ffn_kind`` (``gqa``, ``swiglu``, ``linear``, ``no_op``), ``kv_heads`` (0 unless gqa) and
    ``ffn_size`` (0 unless swiglu). Callers must not mutate the result.
    """
    a, f = parse_label(label)
    attention, ffn = (s.strip() for s in label.split("|"))
    return {
        "variant": f"{attention}|{ffn}",
        "attention": attention,
        "ffn": ffn,
        "attention_kind": a["kind"],
        "ffn_kind": f["kind"],
        "kv_heads": a.get("num_key_value_heads", 0),
        "ffn_size": f.get("intermediate_size", 0),
    }


_KINDS = {"attention_kind": ("gqa", "linear", "no_op"), "ffn_kind": ("swiglu", "linear", "no_op")}


def is_well_formed(attribute: str, value: object) -> bool:
    """Whether ``value`` is a valid value of a label-derived attribute (``no_op`` for ``ffn``, ...).

    Custom constraints may name a valid variant that a library happens to lack; anything else
    that no candidate has is treated as a typo.
    """
    if not isinstance(value, str):
        return False
    if attribute == "attention":
        return bool(_ATTENTION.match(value))
    if attribute == "ffn":
        return bool(_FFN.match(value))
    if attribute == "variant":
        parts = value.split("|")
        return len(parts) == 2 and bool(_ATTENTION.match(parts[0])) and bool(_FFN.match(parts[1]))
    return value in _KINDS.get(attribute, ())
