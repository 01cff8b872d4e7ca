"""The examples run on the real parent, so they cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_smollm2

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow  # SmolLM2 in a subprocess
@requires_smollm2
def test_handmade_child(tmp_path, smollm2_source):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "handmade_child.py"), "--sequences", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kl = float(re.search(r"KL ([0-9.]+) nats/token", proc.stdout).group(1))
    assert 0.01 < kl < 5.0  # removing 4 attention sub-blocks changes the model, but not into noise
    assert "reload is exact: True" in proc.stdout
    assert (tmp_path / "deci" / "config.json").is_file()
