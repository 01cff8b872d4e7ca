"""Predicates on one layer's attributes, the atoms of custom constraints (:mod:`solvers.expressions`).

    attention != "no_op"                      # an Attr compared with a value is a Pred
    (ffn == "no_op") & (attr("layer") >= 100)   # Preds combine with &, |, ~
    is_parent                                  # an Attr alone means "is true"

A predicate is evaluated on the mapping that :meth:`solvers.candidates.Candidate.member_attributes` gives for
one covered layer. :func:`check_atoms` rejects, when a constraint is compiled, an attribute that no candidate
has, or an equality test against a value that no candidate has and that is not a valid label either (a typo).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from solvers.errors import ProblemError
from solvers.labels import is_well_formed

if TYPE_CHECKING:
    from solvers.candidates import Catalog

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_:]*$")


def render(value: Any) -> str:
    """A value as the text parser reads it back, exactly: bare words unquoted, numbers in full."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() and abs(value) < 1e18 else repr(float(value))
    s = str(value)
    return s if _BARE.match(s) and s not in ("and", "or", "not", "true", "false") else repr(s)


@dataclass(frozen=True, eq=False)
class Pred:
    """A predicate on one layer's attributes; combine with ``&``, ``|``, ``~``."""

    fn: Callable[[Mapping[str, Any]], bool]
    text: str
    atoms: tuple[tuple[str, str, Any], ...] = ()
    """``(attribute, op, value)`` comparisons inside, checked against the problem when compiled."""

    def __call__(self, attrs: Mapping[str, Any]) -> bool:
        return self.fn(attrs)

    def __and__(self, other: Pred | Attr) -> Pred:
        a, b = self, as_pred(other)
        return Pred(lambda m: a(m) and b(m), f"({a.text} and {b.text})", a.atoms + b.atoms)

    def __or__(self, other: Pred | Attr) -> Pred:
        a, b = self, as_pred(other)
        return Pred(lambda m: a(m) or b(m), f"({a.text} or {b.text})", a.atoms + b.atoms)

    def __invert__(self) -> Pred:
        a = self
        return Pred(lambda m: not a(m), f"not {a.text}", a.atoms)

    def __bool__(self) -> bool:
        raise TypeError("combine predicates with &, | and ~ (Python's and/or/not cannot be overloaded)")


class Attr:
    """A named attribute of a layer; comparing it with a value makes a :class:`Pred`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _compare(self, op: str, value: Any) -> Pred:
        name, fn = self.name, _OPS[op]

        def test(m: Mapping[str, Any]) -> bool:
            have = m.get(name)
            if have is None:
                return False
            try:
                return bool(fn(have, value))
            except TypeError:  # e.g. "gqa:3" < 4
                return False

        return Pred(test, f"{name} {op} {render(value)}", ((name, op, value),))

    def __eq__(self, value: Any) -> Pred:  # type: ignore[override]
        return self._compare("==", value)

    def __ne__(self, value: Any) -> Pred:  # type: ignore[override]
        return self._compare("!=", value)

    def __lt__(self, value: Any) -> Pred:
        return self._compare("<", value)

    def __le__(self, value: Any) -> Pred:
        return self._compare("<=", value)

    def __gt__(self, value: Any) -> Pred:
        return self._compare(">", value)

    def __ge__(self, value: Any) -> Pred:
        return self._compare(">=", value)

    def __and__(self, other: Pred | Attr) -> Pred:
        return as_pred(self) & other

    def __or__(self, other: Pred | Attr) -> Pred:
        return as_pred(self) | other

    def __invert__(self) -> Pred:
        return ~as_pred(self)

    __hash__ = None  # type: ignore[assignment]


def attr(name: str) -> Attr:
    return Attr(name)


def as_pred(p: Pred | Attr) -> Pred:
    """An :class:`Attr` used alone means "is true" (``count(is_parent)``)."""
    if isinstance(p, Pred):
        return p
    if isinstance(p, Attr):
        name = p.name
        return Pred(lambda m: bool(m.get(name)), name, ((name, "truthy", True),))
    raise TypeError(f"expected a predicate such as attention == 'no_op', got {p!r}")


attention, ffn, variant = Attr("attention"), Attr("ffn"), Attr("variant")
attention_kind, ffn_kind = Attr("attention_kind"), Attr("ffn_kind")
kv_heads, ffn_size, is_parent = Attr("kv_heads"), Attr("ffn_size"), Attr("is_parent")


def check_atoms(problem: Catalog, pred: Pred) -> None:
    """Reject unknown attributes, and equality tests against values that no candidate has and that
    are not valid labels either (typos such as ``attention == noop``)."""
    seen = problem.attribute_values
    for name, op, value in pred.atoms:
        if name not in seen:
            raise ProblemError(f"{pred.text}: unknown attribute {name!r}; attributes: {sorted(seen)}")
        if op in ("==", "!=") and value not in seen[name] and not is_well_formed(name, value):
            shown = sorted(map(str, seen[name]))[:20]
            raise ProblemError(f"{pred.text}: no candidate has {name} = {render(value)}; values: {shown}")
