"""Custom constraints as a tiny expression language over per-layer attributes.

    from solvers.expressions import attention, attr, count, ffn, layer, total
    problem = problem.with_constraints(
        count(attention != "no_op") >= 8,          # keep at least 8 attention layers
        layer[0] == "parent",                       # layer 0 untouched
        layer[5].ffn == "swiglu:14336",            # one sub-block pinned
        total("params") <= 70e9,                    # chosen + fixed parameters
        count((ffn == "no_op") & (attr("layer") >= 100)) <= 4,
    )

Each compiles to one linear row ``sum_c coef_c * x_c (<= | >= | ==) rhs``:

* ``count(pred)`` counts layers: candidate ``c`` gets the number of layers it covers whose member
  block satisfies ``pred`` (a fused 4-layer run with no attention counts 4 for
  ``attention == "no_op"``).
* ``total(column)`` sums a cost or score column over the chosen candidates, plus its fixed cost.
* ``layer[i] == value`` holds when layer ``i``'s block has label ``value`` (``"parent"``: it is
  the parent's); ``layer[i].attr == value`` tests one attribute; ``!=`` negates either.

Attributes (see :meth:`solvers.candidates.Candidate.member_attributes`): ``variant``, ``attention``,
``ffn``, ``attention_kind``, ``ffn_kind``, ``kv_heads``, ``ffn_size``, ``is_parent``, ``layer``,
``span``, every cost and score column, and extra table columns. Predicates
(:mod:`solvers.predicates`) combine with ``&``, ``|``, ``~``. A constraint that names an unknown
attribute, or compares with a value that no candidate has and that is not a valid label either (a
typo), is rejected when compiled. Text versions parse with :func:`solvers.parse.parse_constraint`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from solvers.constraints import Constraint
from solvers.errors import ProblemError
from solvers.model import LinearConstraint
from solvers.predicates import (Attr, Pred, as_pred, attention, attention_kind, attr, check_atoms, ffn, ffn_kind,
                                ffn_size, is_parent, kv_heads, render, variant)

if TYPE_CHECKING:
    from solvers.problem import Problem

__all__ = ["Attr", "Count", "ExprConstraint", "LayerIs", "LayerRef", "LinExpr", "Pred", "Term", "Total", "as_pred",
           "attention", "attention_kind", "attr", "count", "ffn", "ffn_kind", "ffn_size", "is_parent", "kv_heads",
           "layer", "render", "total", "variant"]


def _unwrap(text: str) -> str:
    """Drop one pair of parentheses around the whole text: ``(a and b)`` -> ``a and b``."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and i < len(text) - 1:
            return text
    return text[1:-1] if text.startswith("(") else text


# -- linear expressions --------------------------------------------------------------------------
class Term:
    """A linear function of the choice: per-candidate coefficients plus a constant."""

    text: str

    def coefs(self, problem: Problem) -> tuple[dict[int, float], float]:
        raise NotImplementedError

    def evaluate(self, problem: Problem, chosen: Sequence[int]) -> float:
        """The same value computed from the chosen candidates directly (used by verification)."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Count(Term):
    pred: Pred

    @property
    def text(self) -> str:
        return f"count({_unwrap(self.pred.text)})"

    def _n(self, problem: Problem, i: int) -> int:
        c = problem.candidates[i]
        return sum(1 for layer in c.layers if self.pred(c.member_attributes(layer)))

    def coefs(self, problem: Problem) -> tuple[dict[int, float], float]:
        check_atoms(problem, self.pred)
        return {i: float(n) for i in range(len(problem.candidates)) if (n := self._n(problem, i))}, 0.0

    def evaluate(self, problem: Problem, chosen: Sequence[int]) -> float:
        return float(sum(self._n(problem, i) for i in chosen))


@dataclass(frozen=True, eq=False)
class Total(Term):
    column: str

    @property
    def text(self) -> str:
        return f"total({self.column})"

    def coefs(self, problem: Problem) -> tuple[dict[int, float], float]:
        return dict(enumerate(problem.column(self.column))), float(problem.fixed.get(self.column, 0.0))

    def evaluate(self, problem: Problem, chosen: Sequence[int]) -> float:
        return problem.sum_of(self.column, chosen)


@dataclass(frozen=True, eq=False)
class LayerIs(Term):
    """1 if layer ``index``'s block satisfies ``pred``, else 0."""

    index: int
    pred: Pred
    shown: str

    @property
    def text(self) -> str:
        return self.shown

    def _check(self, problem: Problem) -> None:
        if not 0 <= self.index < problem.num_layers:
            raise ProblemError(f"{self.shown}: layer {self.index} does not exist (layers 0..{problem.num_layers - 1})")
        check_atoms(problem, self.pred)

    def coefs(self, problem: Problem) -> tuple[dict[int, float], float]:
        self._check(problem)
        cands = problem.candidates
        return {i: 1.0 for i in problem.cover[self.index] if self.pred(cands[i].member_attributes(self.index))}, 0.0

    def evaluate(self, problem: Problem, chosen: Sequence[int]) -> float:
        self._check(problem)
        cands = problem.candidates
        return float(sum(1 for i in chosen if self.index in cands[i].layers
                         and self.pred(cands[i].member_attributes(self.index))))


class LinExpr:
    """``sum weight * term + const``; compare with ``<=``, ``>=``, ``==`` to make a constraint."""

    def __init__(self, terms: Sequence[tuple[float, Term]] = (), const: float = 0.0) -> None:
        self.terms, self.const = tuple(terms), float(const)

    @staticmethod
    def of(x: LinExpr | Term | float) -> LinExpr:
        if isinstance(x, LinExpr):
            return x
        if isinstance(x, Term):
            return LinExpr([(1.0, x)])
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return LinExpr(const=x)
        raise TypeError(f"expected count(...), total(...) or a number, got {x!r}")

    @property
    def text(self) -> str:
        parts = []
        for w, t in self.terms:
            sign = "-" if w < 0 else "+"
            parts.append(f"{sign} {'' if abs(w) == 1 else f'{abs(w):g} * '}{t.text}")
        if self.const or not parts:
            parts.append(f"{'-' if self.const < 0 else '+'} {abs(self.const):g}")
        text = " ".join(parts)
        return text[2:] if text.startswith("+ ") else "-" + text[2:]

    def coefs(self, problem: Problem) -> tuple[dict[int, float], float]:
        out: dict[int, float] = {}
        const = self.const
        for w, t in self.terms:
            cs, k = t.coefs(problem)
            for i, v in cs.items():
                out[i] = out.get(i, 0.0) + w * v
            const += w * k
        return {i: v for i, v in out.items() if v}, const

    def evaluate(self, problem: Problem, chosen: Sequence[int]) -> float:
        return self.const + sum(w * t.evaluate(problem, chosen) for w, t in self.terms)

    def __add__(self, other: LinExpr | Term | float) -> LinExpr:
        o = LinExpr.of(other)
        return LinExpr(self.terms + o.terms, self.const + o.const)

    __radd__ = __add__

    def __mul__(self, k: float) -> LinExpr:
        if not isinstance(k, (int, float)) or isinstance(k, bool):
            raise TypeError("expressions stay linear: multiply by a number only")
        return LinExpr([(w * k, t) for w, t in self.terms], self.const * k)

    __rmul__ = __mul__

    def __neg__(self) -> LinExpr:
        return self * -1

    def __sub__(self, other: LinExpr | Term | float) -> LinExpr:
        return self + (-LinExpr.of(other))

    def __rsub__(self, other: LinExpr | Term | float) -> LinExpr:
        return LinExpr.of(other) - self

    def _constraint(self, sense: str, other: LinExpr | float) -> ExprConstraint:
        o = LinExpr.of(other)
        if o.terms:  # a <= b  ->  a - b <= 0
            return ExprConstraint(self - o, sense, 0.0, text=f"{self.text} {sense} {o.text}")
        return ExprConstraint(self, sense, o.const)

    def __le__(self, other: LinExpr | float) -> ExprConstraint:
        return self._constraint("<=", other)

    def __ge__(self, other: LinExpr | float) -> ExprConstraint:
        return self._constraint(">=", other)

    def __eq__(self, other: LinExpr | float) -> ExprConstraint:  # type: ignore[override]
        return self._constraint("==", other)

    def __lt__(self, other: object) -> ExprConstraint:
        raise TypeError("use <= or >= (a strict bound on a sum of choices is ambiguous)")

    __gt__ = __lt__
    __hash__ = None  # type: ignore[assignment]

    def __bool__(self) -> bool:
        raise TypeError("an expression has no truth value; compare it with <=, >= or ==")


class ExprConstraint(Constraint):
    """``expr (sense) target`` for a :class:`LinExpr`."""

    quantity = "value"

    def __init__(self, expr: LinExpr, sense: str, target: float, *, text: str | None = None) -> None:
        self.expr, self.sense, self.target = expr, sense, float(target)
        self._text = text or f"{expr.text} {sense} {render(self.target)}"
        self.quantity = expr.text

    @property
    def name(self) -> str:
        return self._text

    def compile(self, problem: Problem) -> LinearConstraint:
        coefs, const = self.expr.coefs(problem)
        return LinearConstraint(self.name, coefs, self.sense, self.target - const)

    def measure(self, problem: Problem, chosen: Sequence[int]) -> float:
        return self.expr.evaluate(problem, chosen)

    def from_lhs(self, problem: Problem, lhs: float) -> float:
        return lhs + self.expr.coefs(problem)[1]

    def __repr__(self) -> str:
        return f"ExprConstraint({self.name!r})"


def count(pred: Pred | Attr) -> LinExpr:
    """Number of layers whose block satisfies ``pred``."""
    return LinExpr.of(Count(as_pred(pred)))


def total(column: str) -> LinExpr:
    """Sum of a cost or score column over the chosen candidates, plus its fixed cost."""
    return LinExpr.of(Total(column))


class LayerRef:
    """``layer[i]``: compare with a label (or ``"parent"``), or pick an attribute: ``layer[i].ffn``."""

    def __init__(self, index: int, attribute: str | None = None) -> None:
        self.index, self.attribute = index, attribute

    def __getattr__(self, name: str) -> LayerRef:
        if name.startswith("_") or self.attribute is not None:
            raise AttributeError(name)
        return LayerRef(self.index, name)

    def matches(self, value: Any) -> LinExpr:
        """1 if the layer matches ``value`` (see the module docstring), else 0."""
        if self.attribute is None:
            pred = (is_parent == True) if value == "parent" else (variant == value)  # noqa: E712 (builds a Pred)
        else:
            pred = Attr(self.attribute) == value
        where = f"layer[{self.index}]" + (f".{self.attribute}" if self.attribute else "")
        return LinExpr.of(LayerIs(self.index, pred, f"{where} == {render(value)}"))

    def __eq__(self, value: Any) -> ExprConstraint:  # type: ignore[override]
        m = self.matches(value)
        return ExprConstraint(m, "==", 1.0, text=m.terms[0][1].text)

    def __ne__(self, value: Any) -> ExprConstraint:  # type: ignore[override]
        m = self.matches(value)
        return ExprConstraint(m, "==", 0.0, text=m.terms[0][1].text.replace(" == ", " != ", 1))

    __hash__ = None  # type: ignore[assignment]


class _LayerSelector:
    def __getitem__(self, index: int) -> LayerRef:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"layer[...] takes one layer index, got {index!r}")
        return LayerRef(index)


layer = _LayerSelector()
