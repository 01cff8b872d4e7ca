"""Issue 31's reliability suite: every single-command case of ``benchmarks/reliability_cases.py`` (a read-only
``--out``, ``--out FILE/sub``, corrupt weights, a missing tokenizer, binary or malformed data, an impossible
constraint, a cluster larger than the machine, a broken config.json, ...) run as the ``puzzle`` CLI in a
subprocess on the tiny parent: exit status 2, no traceback, a first line of stderr that says what is wrong,
and nothing written under the case's directory.

The cases run once per module, two at a time (each spends most of its ~10 s importing torch), in the
``outcomes`` fixture; each test then reads its own. ``python benchmarks/reliability.py`` runs the same
table and writes ``benchmarks/results/reliability.csv``.
"""

from __future__ import annotations

import re

import pytest

from benchmarks.reliability_cases import CASES, TINY, Case, puzzle
from benchmarks.reliability_run import Outcome, run_case, run_cases

pytestmark = pytest.mark.slow  # about 25 subprocesses of ~10 s each


@pytest.fixture(scope="module")
def outcomes(request, tiny_text_parent, tmp_path_factory) -> dict[str, Outcome]:
    """The outcome of every case this session selected (``-k`` picks a few), run together."""
    wanted = {item.callspec.params["case"].name for item in request.session.items
              if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})}
    cases = [c for c in CASES if c.name in wanted]
    return {o.case.name: o for o in run_cases(cases, tiny_text_parent, tmp_path_factory.mktemp("reliability"))}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_refused_in_one_line_before_any_write(case: Case, outcomes):
    o = outcomes[case.name]
    if o.skipped:
        pytest.skip(o.skipped)
    assert "Traceback" not in o.stdout + o.stderr, o.explain()
    assert o.written == [], o.explain()
    assert o.exit == case.exit, o.explain()
    assert re.search(case.message, o.first_line), o.explain()


def test_the_cases_settings_alone_are_accepted(tiny_text_parent, tmp_path):
    """The control: ``puzzle plan`` with the cases' tiny settings exits 0 and writes nothing, so each case is
    refused for what it breaks."""
    control = Case("control", 0, lambda t, p: puzzle("plan", *TINY, "--model", str(p), "--out", str(t / "run")),
                   message="", exit=0)
    o = run_case(control, tiny_text_parent, tmp_path)
    assert (o.exit, o.written, o.verdict) == (0, [], "ok"), o.explain()
    assert "budget: speedup >= 1.2x" in o.stdout and re.search(r"bld_tokens +2048 +\(flag\)", o.stdout)


def test_the_verdict_names_the_worst_failure():
    case = Case("c", 5, lambda t, p: [], message=r"is a file")
    line = "puzzle search: error: --out x/FILE/sub: x/FILE is a file"
    assert Outcome(case, 2, stderr=line + "\n").verdict == "ok"
    assert Outcome(case, 2, stderr="WARNING something\n" + line).verdict == "wrong-message"  # the first line only
    assert Outcome(case, 0, stderr=line).verdict == "wrong-exit"
    assert Outcome(case, None, stderr=line, written=["run/plan.json"]).verdict == "wrote"
    crash = "Traceback (most recent call last):\n  ...\nKeyError: 'num_hidden_layers'\n"
    assert Outcome(case, 1, stderr=crash, written=["run/plan.json"]).verdict == "traceback"
    assert Outcome(case, 1, stderr=crash).last_line == "KeyError: 'num_hidden_layers'"  # the CSV's last_line
    assert Outcome(case, None, skipped="no read-only mount").verdict == "skipped"


def test_every_case_has_a_unique_name_and_a_point_of_the_issue():
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.why for c in CASES} == {3, 4, 5, 6, 7, 8}
    for c in CASES:
        re.compile(c.message)
