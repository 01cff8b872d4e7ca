"""`solvers` (and the `puzzle solve` CLI module) never import torch, directly or indirectly."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import solvers

ROOT = Path(__file__).resolve().parents[2]


def test_importing_every_solvers_module_and_the_cli_does_not_import_torch():
    modules = sorted(m.name for m in pkgutil.walk_packages(solvers.__path__, "solvers."))
    assert {"solvers.backends.pulp_cbc", "solvers.backends.ortools_cpsat", "solvers.backends.ortools_mip",
            "solvers.problem", "solvers.expressions", "solvers.parse", "solvers.verify", "solvers.plot"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {['solvers', *modules, 'puzzle.cli.solve_cmd', 'puzzle.cli.main']!r}:\n"
        "    importlib.import_module(name)\n"
        "from solvers.plot import plot_frontier\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print('torch modules:', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch modules: []" in result.stdout
