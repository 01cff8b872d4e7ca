"""Context-aware scores and refinement, on the trained tiny library: exact where first order is exact."""

from __future__ import annotations

import pytest

from block_library import open_library
from puzzle.errors import ConfigError
from puzzle.evaluation.quality import evaluate_quality
from puzzle.loading import load_model, load_tokenizer
from puzzle.schema import blocks_from_list
from puzzle.scoring.context import COLUMN, UNSCORED, context_scores, parent_reference
from puzzle.search.finalists import finalist_ids, measure_finalists, parent_logprobs
from puzzle.search.refine import refine
from solvers import solve
from solvers.backends import DEFAULT_BACKEND
from solvers.diverse import diverse_solutions
from solvers.labels import block_dict
from tests.scoring.test_finalists import budget_problem

pytestmark = pytest.mark.slow  # the tiny library's build (shared with the other scoring tests)


@pytest.fixture(scope="module")
def setting(scored_additive, tiny_library, tiny_text_parent):  # noqa: ANN001, ANN201
    lib = open_library(tiny_library)
    parent, tok = load_model(str(tiny_text_parent)), load_tokenizer(str(tiny_text_parent))
    problem, _ = budget_problem(scored_additive, lib, 0.6)
    ids = finalist_ids(["stdlib"], tok, skip=0, sequences=2)[:, :64]  # (2, 64)
    return lib, parent, problem, ids


def _kl(lib, parent, labels, ids) -> float:  # noqa: ANN001
    child = lib.assemble(blocks_from_list([block_dict(b) for b in labels]))
    return evaluate_quality(child, ids, parent=parent)["kl"]


def test_around_the_parent_they_are_the_replace1_scores(setting):
    lib, parent, problem, ids = setting
    base = [b.label for b in lib.parent_config.blocks]
    cs = context_scores(lib, base, ids, parent_reference(parent, ids))
    assert cs.base_kl == pytest.approx(0.0, abs=1e-6) and cs.tokens == 2 * 63
    n_halves = sum(len(lib.labels(l, s)) - 1 for l in range(3) for s in ("attention", "ffn"))
    assert len(cs.halves) == n_halves
    for (l, sub, label), d in list(cs.halves.items())[::5]:  # every fifth: a half swapped into the parent
        swapped = list(base)
        a, f = base[l].split("|")
        swapped[l] = f"{label}|{f}" if sub == "attention" else f"{a}|{label}"
        assert d == pytest.approx(_kl(lib, parent, swapped, ids), rel=1e-4, abs=1e-6)


def test_one_swap_is_predicted_exactly_and_pairs_additively(setting):
    lib, parent, problem, ids = setting
    base = solve(problem).layer_labels()  # the MIP's optimum: a child far from the parent
    cs = context_scores(lib, base, ids, parent_reference(parent, ids))
    assert cs.base_kl == pytest.approx(_kl(lib, parent, base, ids), rel=1e-4) and cs.base_kl > 1e-3
    assert cs.predict(base) == cs.base_kl
    a0, f0 = base[1].split("|")
    other_f = next(f for f in lib.labels(1, "ffn") if f != f0)
    other_a = next(a for a in lib.labels(1, "attention") if a != a0)
    one = list(base)
    one[1] = f"{a0}|{other_f}"  # first order is exact for one swap
    assert cs.predict(one) == pytest.approx(_kl(lib, parent, one, ids), rel=1e-4)
    both = list(base)
    both[1] = f"{other_a}|{other_f}"  # both halves: the sum of the halves' deltas
    assert cs.delta(1, both[1]) == pytest.approx(cs.halves[(1, "attention", other_a)] + cs.halves[(1, "ffn", other_f)])
    with pytest.raises(ConfigError, match="layers"):
        cs.predict(base[:2])
    with pytest.raises(ConfigError, match="no context score"):
        cs.delta(1, f"{a0}|swiglu:7")
    # as a problem: the objective is the prediction minus the base's KL, the budget the same
    p2 = cs.problem(problem)
    assert p2.score_column == COLUMN and p2.budget == problem.budget
    assert [c.id for c in p2.candidates] == [c.id for c in problem.candidates]
    s = solve(p2)
    assert s.objective == pytest.approx(cs.predict(s.layer_labels()) - cs.base_kl, abs=1e-9)
    assert s.objective <= 1e-12  # the base is feasible and scores 0: the optimum is at most that


def test_only_the_halves_asked_for_are_measured_and_the_problem_keeps_their_blocks(setting):
    lib, parent, problem, ids = setting
    base = solve(problem).layer_labels()
    a0, f0 = base[2].split("|")
    other_f = next(f for f in lib.labels(2, "ffn") if f != f0)
    other_a = next(a for a in lib.labels(2, "attention") if a != a0)
    cs = context_scores(lib, base, ids, parent_reference(parent, ids), only={2: {f"{other_a}|{other_f}"}})
    assert set(cs.halves) == {(2, "attention", other_a), (2, "ffn", other_f)}
    p2 = cs.problem(problem)
    scored = {(c.layers[0], c.members[0]) for c in p2.candidates if c.scores[COLUMN] != UNSCORED}
    assert scored == {(0, base[0]), (1, base[1]), (2, base[2]), (2, f"{a0}|{other_f}"), (2, f"{other_a}|{f0}"),
                      (2, f"{other_a}|{other_f}")}
    s = solve(p2)  # never an unscored block: the base is feasible at 0
    assert all((l, b) in scored for l, b in enumerate(s.layer_labels())) and s.objective <= 1e-12


def test_refinement_keeps_the_budget_and_measures_each_child(setting):
    lib, parent, problem, ids = setting
    sols = diverse_solutions(problem, 3, min_fraction=0.3)
    fin = measure_finalists(lib, parent, sols, ids)
    assert fin[0].kl < fin[-1].kl
    steps = refine(problem, lib, fin, ids, parent_logprobs(parent, ids), rounds=3, backend=DEFAULT_BACKEND)
    assert len(steps) <= 3
    best = fin[0].kl
    for k, st in enumerate(steps):
        f = st.finalist
        assert f.mip_rank == 3 + k and st.round == k
        assert all(b in {g.solution.layer_labels()[l] for g in fin} for l, b in enumerate(f.solution.layer_labels()))
        assert f.solution.layer_labels() not in [g.solution.layer_labels() for g in fin]  # a new child
        assert f.solution.problem is problem and f.solution.totals.params <= problem.budget.max_params
        assert f.solution.objective == pytest.approx(sum(
            c.scores["kl"] for c in f.solution.candidates))  # re-expressed on the original scores
        assert f.kl == pytest.approx(_kl(lib, parent, f.solution.layer_labels(), ids), rel=1e-4)
        assert st.base_kl == pytest.approx(best, rel=1e-4)  # each round starts from the best measured so far
        best = min(best, f.kl)
    with pytest.raises(ConfigError, match="rounds"):
        refine(problem, lib, fin, ids, parent_logprobs(parent, ids), rounds=-1, backend=DEFAULT_BACKEND)
