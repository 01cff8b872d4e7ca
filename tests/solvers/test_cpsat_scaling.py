"""CP-SAT's integer scaling is conservative: an integer-feasible choice is feasible on the real costs."""

from __future__ import annotations

import itertools
import random

import pytest

from solvers.backends.ortools_cpsat import BITS, _integer_row, _scale
from solvers.model import LinearConstraint


def _sum(coefs, chosen):
    return sum(coefs.get(i, 0) for i in chosen)


def test_integer_rows_are_exact_and_fractional_rows_conservative():
    rng = random.Random(0)
    for trial in range(200):
        n = 8
        integral = trial % 2 == 0
        coefs = {i: float(rng.randint(0, 10**9)) if integral else rng.uniform(0.01, 3.0) for i in range(n)}
        sense = rng.choice(["<=", ">="])
        subsets = [s for k in range(1, 4) for s in itertools.combinations(range(n), k)]
        rhs = _sum(coefs, rng.choice(subsets))  # a bound that some choice meets exactly: the hardest case
        row = LinearConstraint("r", coefs, sense, rhs)
        icoefs, lower, upper = _integer_row(row)
        for s in subsets:
            real_ok = _sum(coefs, s) <= rhs if sense == "<=" else _sum(coefs, s) >= rhs
            int_ok = lower <= _sum(icoefs, s) <= upper
            if int_ok:
                assert real_ok  # never admits a truly infeasible choice
            if integral:
                assert int_ok == real_ok  # integer data: exact


def test_boundary_within_float_noise_is_handled_conservatively():
    # 0.1 + 0.2 = 0.30000000000000004 > 0.3 in floating point: the real row rejects it, so must CP-SAT
    row = LinearConstraint("r", {0: 0.1, 1: 0.2}, "<=", 0.3)
    icoefs, _, upper = _integer_row(row)
    assert icoefs[0] + icoefs[1] > upper
    # the price of rounding coefficients up: a choice with real slack below n / 2^k (here 2 / 2^42) is lost
    row = LinearConstraint("r", {0: 0.1, 1: 0.2}, "<=", 0.1 + 0.2)
    icoefs, _, upper = _integer_row(row)
    assert icoefs[0] + icoefs[1] == upper + 1
    row = LinearConstraint("r", {0: 0.1, 1: 0.2}, "<=", 0.3 + 1e-12)
    icoefs, _, upper = _integer_row(row)
    assert icoefs[0] + icoefs[1] <= upper


def test_scale_targets_2_to_the_40():
    assert _scale([3.0, 17.0]) == 1.0
    s = _scale([0.25, 1.5])
    assert s == 2.0 ** (BITS - 1) and 1.5 * s == pytest.approx(2 ** 40 * 0.75)
    assert _scale([2.0**41]) == 2.0 ** -1  # too large for exact integers: scaled down too
