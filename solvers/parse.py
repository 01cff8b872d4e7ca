"""Read a custom constraint from text, safely (a hand-written parser; nothing is ``eval``-ed).

Examples (what ``puzzle solve --constraint`` accepts)::

    count(attention != no_op) >= 8
    count(ffn_kind == swiglu and layer < 10) == 10
    layer[0] == parent
    layer[3].attention == "gqa:8"
    total(params) <= 70e9
    count(attention == no_op) - count(ffn == no_op) <= 2

Grammar::

    statement := expr ("<=" | ">=" | "==") expr
               | "layer" "[" INT "]" ["." NAME] ("==" | "!=") value
    expr      := product (("+" | "-") product)*
    product   := factor ("*" factor)*               at most one factor that is not a number
    factor    := "-" factor | NUMBER | "count" "(" pred ")" | "total" "(" NAME ")" | "(" expr ")"
    pred      := conj (("or" | "|") conj)*
    conj      := unary (("and" | "&") unary)*
    unary     := ("not" | "~") unary | "(" pred ")" | NAME [("==" | "!=" | "<" | "<=" | ">" | ">=") value]
    value     := "quoted" | 'quoted' | NUMBER | WORD     (true / false are booleans)

A WORD may contain ``:`` (``gqa:8``, ``swiglu:1536``); a whole block label contains ``|`` and
must be quoted: ``layer[0] == "gqa:8|swiglu:14336"``.
"""

from __future__ import annotations

import re
from typing import Any

from solvers.errors import ConstraintSyntaxError
from solvers.expressions import ExprConstraint, LinExpr, count, layer, total
from solvers.predicates import Attr, Pred, as_pred

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<str>"[^"]*"|'[^']*')
    | (?P<op><=|>=|==|!=|<|>|\[|\]|\(|\)|\.|\+|-|\*|&|\||~)
    | (?P<word>[A-Za-z_][A-Za-z0-9_:]*)
    )""", re.VERBOSE)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CMP = ("==", "!=", "<", "<=", ">", ">=")


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            start = len(text) - len(text[pos:].lstrip())
            raise ConstraintSyntaxError(f"constraint {text!r}: unexpected character {text[start]!r} "
                                        f"at position {start}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    tokens.append(("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.tokens, self.i = text, _tokenize(text), 0

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def peek(self) -> tuple[str, str, int]:
        return self.tokens[self.i]

    def at(self, *values: str) -> bool:
        kind, value, _ = self.peek
        return kind in ("op", "word") and value in values

    def take(self) -> tuple[str, str, int]:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def fail(self, expected: str) -> ConstraintSyntaxError:
        kind, value, pos = self.peek
        found = "the end" if kind == "end" else repr(value)
        return ConstraintSyntaxError(f"constraint {self.text!r}: expected {expected} at position {pos}, found {found}")

    def expect(self, value: str) -> None:
        if not self.at(value):
            raise self.fail(repr(value))
        self.take()

    def name(self) -> str:
        kind, value, _ = self.peek
        if kind == "str":
            value = value[1:-1]
        elif kind != "word":
            raise self.fail("an attribute or column name")
        if not _NAME.match(value):
            raise self.fail("a name (quote block labels that contain ':' or '|' and put them after ==)")
        self.take()
        return value

    def value(self) -> Any:
        kind, text, _ = self.peek
        if kind == "str":
            self.take()
            return text[1:-1]
        if kind == "num":
            self.take()
            return int(text) if re.fullmatch(r"\d+", text) else float(text)
        if kind == "word":
            self.take()
            return {"true": True, "false": False}.get(text, text)
        raise self.fail("a value (a word, a number or a quoted string)")

    # -- statements ------------------------------------------------------------------------------
    def statement(self) -> ExprConstraint:
        if self.at("layer") and self.tokens[self.i + 1][1] == "[":
            result = self.layer_statement()
        else:
            left = self.expr()
            if not self.at("<=", ">=", "=="):
                raise self.fail("<=, >= or ==")
            sense = self.take()[1]
            right = self.expr()
            result = {"<=": left <= right, ">=": left >= right, "==": left == right}[sense]
        if self.peek[0] != "end":
            raise self.fail("the end of the constraint")
        return result

    def layer_statement(self) -> ExprConstraint:
        self.take()
        self.expect("[")
        kind, text, _ = self.peek
        if kind != "num" or not text.isdigit():
            raise self.fail("a layer index")
        self.take()
        self.expect("]")
        ref = layer[int(text)]
        if self.at("."):
            self.take()
            ref = getattr(ref, self.name())
        if not self.at("==", "!="):
            raise self.fail("== or !=")
        op = self.take()[1]
        value = self.value()
        return ref == value if op == "==" else ref != value

    # -- linear expressions ----------------------------------------------------------------------
    def expr(self) -> LinExpr:
        out = self.product()
        while self.at("+", "-"):
            op = self.take()[1]
            out = out + self.product() if op == "+" else out - self.product()
        return out

    def product(self) -> LinExpr:
        out = self.factor()
        while self.at("*"):
            self.take()
            right = self.factor()
            if out.terms and right.terms:
                raise self.fail("a number (expressions must stay linear)")
            out = out * right.const if not right.terms else right * out.const
        return out

    def factor(self) -> LinExpr:
        kind, text, _ = self.peek
        if self.at("-"):
            self.take()
            return -self.factor()
        if kind == "num":
            return LinExpr.of(self.value())
        if self.at("("):
            self.take()
            inner = self.expr()
            self.expect(")")
            return inner
        if self.at("count", "total"):
            self.take()
            self.expect("(")
            out = count(self.pred()) if text == "count" else total(self.name())
            self.expect(")")
            return out
        raise self.fail("count(...), total(...), a number or (")

    # -- predicates ------------------------------------------------------------------------------
    def pred(self) -> Pred:
        out = self.conj()
        while self.at("or", "|"):
            self.take()
            out = out | self.conj()
        return out

    def conj(self) -> Pred:
        out = self.unary()
        while self.at("and", "&"):
            self.take()
            out = out & self.unary()
        return out

    def unary(self) -> Pred:
        if self.at("not", "~"):
            self.take()
            return ~self.unary()
        if self.at("("):
            self.take()
            inner = self.pred()
            self.expect(")")
            return inner
        a = Attr(self.name())
        if not self.at(*_CMP):
            return as_pred(a)
        op = self.take()[1]
        return a._compare(op, self.value())


def parse_constraint(text: str) -> ExprConstraint:
    """Parse one constraint; :class:`ConstraintSyntaxError` gives the position of the problem."""
    if not isinstance(text, str) or not text.strip():
        raise ConstraintSyntaxError(f"constraint must be a non-empty string, got {text!r}")
    return _Parser(text).statement()
