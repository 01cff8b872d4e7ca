"""``examples/custom_constraint.py`` through the real pipeline on a tiny 6-layer parent: the chosen
blocks obey the constraints, and an impossible combination is the solver's typed infeasibility."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from puzzle.errors import InfeasibleBudgetError
from puzzle.loading import load_config
from puzzle.schema import load_blocks
from solvers import InfeasibleError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_constraint.py"

pytestmark = pytest.mark.slow  # a whole search on a 6-layer parent (about 50 s)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("custom_constraint", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory, smollm2_source) -> Path:
    """tests/conftest.py's tiny text parent with 6 layers, so that pinning 3 of them leaves a choice."""
    from benchmarks.tiny_parent import write_tiny_parent

    return write_tiny_parent(tmp_path_factory.mktemp("tiny6"), layers=6)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("custom_constraint") / "run"


def test_the_chosen_blocks_obey_the_constraints(example, tiny6, run_dir, capsys):
    # 5 of 6 layers keep attention and at most 60% of the decoder parameters stay: both bind
    argv = ["--model", str(tiny6), "--small", "--out", str(run_dir), "--min-attention", "5", "--block-params", "0.6"]
    assert example.main(argv) == 0
    out = capsys.readouterr().out
    assert "constraints hold: True" in out and "(pinned)" in out
    parent = load_config(tiny6).blocks
    child = load_blocks(run_dir / "solve" / "blocks.json")
    assert len(child) == 6 and [child[i] == parent[i] for i in (0, 4, 5)] == [True] * 3  # first and last two
    assert sum(b.attention.kind != "no_op" for b in child) >= 5
    assert child != parent  # the speedup budget changed the free layers


def test_an_impossible_combination_is_a_typed_infeasibility(example, tiny6, run_dir, capsys):
    # every layer keeps attention, yet only 10% of the decoder parameters may stay: each alone is feasible
    args = example.parse_args(["--model", str(tiny6), "--small", "--out", str(run_dir), "--min-attention", "6",
                               "--block-params", "0.1"])
    with pytest.raises(InfeasibleBudgetError, match="not all together") as e:
        example.search(args)
    assert isinstance(e.value.__cause__, InfeasibleError) and "total(params)" in str(e.value)
    assert set(e.value.__cause__.diagnosis) >= {"count(attention != no_op) >= 6"}
    capsys.readouterr()
    assert example.main(["--model", str(tiny6), "--small", "--out", str(run_dir), "--min-attention", "6",
                         "--block-params", "0.1"]) == 2
    assert capsys.readouterr().err.startswith("error: infeasible")
