"""Every notebook in ``examples/`` executes top to bottom in its quick mode and checks its own numbers.

Each notebook runs in a fresh ``python3`` kernel of this interpreter with ``PUZZLE_NOTEBOOK_SMALL=1``
(its quick mode) and ``PUZZLE_NOTEBOOK_OUT`` set to a scratch directory it may write into. Its last
code cell must print one line ``NOTEBOOK_CHECK {"ok": true, "checks": {...}, ...}``; the test
fails if any cell raised, if the line is missing, if ``ok`` is not true, or if any check is false.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
MARKER = "NOTEBOOK_CHECK "


def _last_code_output(nb) -> str:  # noqa: ANN001
    """Text the last code cell printed (stdout streams and text results)."""
    cell = [c for c in nb.cells if c.cell_type == "code"][-1]
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream" and out.name == "stdout":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def _check_line(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith(MARKER)]
    assert lines, f"the last code cell printed no {MARKER.strip()} line; it printed:\n{text[-2000:]}"
    return json.loads(lines[-1][len(MARKER):])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    out = tmp_path / "out"
    out.mkdir()
    # The kernel inherits os.environ; monkeypatch restores both variables afterwards.
    monkeypatch.setenv("PUZZLE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PUZZLE_NOTEBOOK_OUT", str(out))
    nb = nbformat.read(path, as_version=4)
    # kernel "python3" launches `python -m ipykernel_launcher`; jupyter_client swaps "python" for
    # sys.executable, so the kernel runs in this interpreter (this venv) with this checkout importable.
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # names the cell and shows its traceback
        pytest.fail(f"{path.name}: a cell raised\n{str(e)[-4000:]}")
    result = _check_line(_last_code_output(nb))
    print(f"{path.name}: {json.dumps(result)}")
    assert result.get("ok") is True, f"{path.name}: NOTEBOOK_CHECK ok is not true: {result}"
    checks = result.get("checks", {})
    assert isinstance(checks, dict), f"{path.name}: checks must be a dict, got {checks!r}"
    failed = sorted(k for k, v in checks.items() if v is not True)
    assert not failed, f"{path.name}: checks failed: {failed} in {result}"
