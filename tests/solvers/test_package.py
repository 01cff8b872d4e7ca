"""``solvers`` hands out its names on first use: ``solvers.files`` (which ``puzzle.io`` uses) loads no pandas or MIP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_names_load_on_first_use():
    code = (
        "import sys, solvers, solvers.files\n"
        "light = not {'pandas', 'pulp', 'ortools', 'solvers.backends'} & set(sys.modules)\n"
        "names = {n: getattr(solvers, n) for n in solvers.__all__}\n"
        "from solvers.problem import Problem\n"
        "print(light, names['Problem'] is Problem, solvers.problem.Problem is Problem, sorted(dir(solvers)) == dir(solvers))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True"] * 4, out.stdout + out.stderr
