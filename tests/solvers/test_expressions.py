"""The custom-constraint language: Python API, safe text parser, and compilation to linear rows."""

from __future__ import annotations

import pytest

from solvers.errors import ConstraintSyntaxError, ProblemError
from solvers.expressions import attention, attr, count, ffn, is_parent, kv_heads, layer, total
from solvers.parse import parse_constraint
from tests.solvers.helpers import random_problem


@pytest.fixture(scope="module")
def problem():
    return random_problem(5, budgets=False)


@pytest.mark.parametrize("text,canonical", [
    ("count(attention != no_op) >= 8", "count(attention != no_op) >= 8"),
    ("count( attention!='no_op' )>=8", "count(attention != no_op) >= 8"),
    ("layer[0] == parent", "layer[0] == parent"),
    ("layer[3].ffn != \"swiglu:1024\"", "layer[3].ffn != swiglu:1024"),
    ('layer[2] == "gqa:8|swiglu:1024"', "layer[2] == 'gqa:8|swiglu:1024'"),
    ("total(params) <= 70e9", "total(params) <= 70000000000"),
    ("total(decode_ms) <= 2.5e-1", "total(decode_ms) <= 0.25"),
    ('total("params") <= 5000', "total(params) <= 5000"),
    ("count(ffn_kind == swiglu and layer < 3) == 3", "count(ffn_kind == swiglu and layer < 3) == 3"),
    ("count(not is_parent | kv_heads >= 4) <= 2", "count(not is_parent or kv_heads >= 4) <= 2"),
    ("count(attention == no_op) - count(ffn == no_op) <= 2", "count(attention == no_op) - count(ffn == no_op) <= 2"),
    ("2 * count(is_parent) + -1 >= 3", "2 * count(is_parent) - 1 >= 3"),
])
def test_parse_gives_a_canonical_name(text, canonical):
    assert parse_constraint(text).name == canonical
    assert parse_constraint(canonical).name == canonical  # the name parses back to itself


def test_text_and_python_api_compile_to_the_same_row(problem):
    pairs = [
        ("count(attention != no_op) >= 4", count(attention != "no_op") >= 4),
        ("layer[0] == parent", layer[0] == "parent"),
        ("layer[1].ffn == no_op", layer[1].ffn == "no_op"),
        ("total(params) <= 5000", total("params") <= 5000),
        ("count(kv_heads >= 4 and not is_parent) <= 1", count((kv_heads >= 4) & ~is_parent) <= 1),
        ("count(attention == no_op) - count(ffn == no_op) <= 2",
         count(attention == "no_op") - count(ffn == "no_op") <= 2),
    ]
    for text, built in pairs:
        a, b = parse_constraint(text).compile(problem), built.compile(problem)
        assert (a.coefs, a.sense, a.rhs) == (b.coefs, b.sense, b.rhs), text


def test_rows_have_the_documented_coefficients(problem):
    row = (count(attention != "no_op") >= 4).compile(problem)
    expected = {i: 1.0 for i, c in enumerate(problem.candidates) if not c.members[0].startswith("no_op")}
    assert row.coefs == expected and row.sense == ">=" and row.rhs == 4.0
    row = (total("params") <= 5000).compile(problem)  # the fixed 500 parameters move to the right
    assert row.rhs == 4500.0 and row.coefs[0] == 1000.0
    row = (layer[2] == "parent").compile(problem)
    assert row.coefs == {problem.parent[2]: 1.0} and row.sense == "==" and row.rhs == 1.0
    row = (layer[2] != "parent").compile(problem)
    assert row.coefs == {problem.parent[2]: 1.0} and row.rhs == 0.0


def test_measure_agrees_with_the_compiled_row(problem):
    """Two independent paths (used by solvers and by verification) give the same value."""
    constraints = [parse_constraint(t) for t in (
        "count(attention != no_op) >= 4", "layer[3].attention == no_op", "total(decode_ms) <= 3",
        "count(ffn == swiglu:1024 or layer >= 4) - total(params) * 0.001 <= 1")]
    chosen = [problem.cover[layer][layer % 4] for layer in range(6)]
    for c in constraints:
        row = c.compile(problem)
        lhs = sum(row.coefs.get(i, 0.0) for i in chosen)
        assert c.from_lhs(problem, lhs) == pytest.approx(c.measure(problem, chosen)), c.name


@pytest.mark.parametrize("text,message", [
    ("count(attention == ) >= 8", "expected a value (a word, a number or a quoted string) at position 19, found ')'"),
    ("count(attention == no_op) > 8", "expected <=, >= or == at position 26, found '>'"),
    ("count(attention == no_op) >= 8 8", "expected the end of the constraint at position 31, found '8'"),
    ("__import__('os').system('true') >= 0", "expected count(...), total(...), a number or ( at position 0"),
    ("count(variant == gqa:8|swiglu:1024) <= 2", "quote block labels"),
    ("layer[x] == parent", "expected a layer index at position 6"),
    ("count(attention == no_op) * count(ffn == no_op) <= 2", "expressions must stay linear"),
    ("count(attention == no_op) <= 2 ; rm -rf /", "unexpected character ';' at position 31"),
    ("", "non-empty"),
])
def test_syntax_errors_say_where(text, message):
    with pytest.raises(ConstraintSyntaxError, match=None) as e:
        parse_constraint(text)
    assert message in str(e.value)


def test_typos_are_rejected_when_compiled(problem):
    with pytest.raises(ProblemError, match=r"unknown attribute 'atention'; attributes: \[.*'attention'"):
        parse_constraint("count(atention == no_op) >= 1").compile(problem)
    with pytest.raises(ProblemError, match=r"no candidate has attention = noop; values: \['gqa:2', 'gqa:4'"):
        parse_constraint("count(attention == noop) >= 1").compile(problem)
    # a valid label that this library lacks is fine: the constraint simply counts 0 for it
    assert parse_constraint("count(ffn == linear) <= 2").compile(problem).coefs == {}
    with pytest.raises(ProblemError, match=r"no candidate has ffn_kind = swiglu1"):
        parse_constraint("count(ffn_kind == swiglu1) <= 2").compile(problem)
    with pytest.raises(ProblemError, match=r"layer 9 does not exist \(layers 0..5\)"):
        (layer[9] == "parent").compile(problem)
    with pytest.raises(ProblemError, match=r"no column 'flops'.*cost columns: \['decode_ms'"):
        (total("flops") <= 1).compile(problem)


def test_python_misuse_fails_loudly():
    with pytest.raises(TypeError, match="combine predicates with &"):
        count((attention == "no_op") and (ffn == "no_op"))
    with pytest.raises(TypeError, match="use <= or >="):
        _ = count(attention == "no_op") < 3
    with pytest.raises(TypeError, match="multiply by a number only"):
        count(is_parent) * count(is_parent)
    assert (count(attr("span") >= 2) <= 1).name == "count(span >= 2) <= 1"
    assert (3 <= count(is_parent)).name == "count(is_parent) >= 3"
