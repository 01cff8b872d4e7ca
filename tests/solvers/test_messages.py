"""`puzzle solve` / `puzzle frontier` say what is wrong: text in a number column, an output path under a file."""

from __future__ import annotations

import pandas as pd
import pytest

from puzzle.cli.main import main
from solvers.errors import TableError
from solvers.io import problem_from_tables
from tests.solvers.test_io_cli import COSTS, SCORES


def _frame(text: str) -> pd.DataFrame:
    return pd.read_csv(pd.io.common.StringIO(text))


def _with_text(table: str, row: int, column: str, value: str) -> str:
    """``table`` (CSV) with data row ``row`` (0-based) of ``column`` replaced by ``value``."""
    lines = table.splitlines()
    col = lines[0].split(",").index(column)
    cells = lines[row + 1].split(",")
    cells[col] = value
    lines[row + 1] = ",".join(cells)
    return "\n".join(lines) + "\n"


def _solve(capsys, tmp_path, scores: str, costs: str, *extra: str) -> tuple[int, str]:
    (tmp_path / "scores.csv").write_text(scores)
    (tmp_path / "costs.csv").write_text(costs)
    code = main(["solve", "--scores", str(tmp_path / "scores.csv"), "--costs", str(tmp_path / "costs.csv"),
                 "--batch", "2", "--context", "10", "--engine", "transformers", *extra])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return code, err


@pytest.mark.parametrize("extra", [["--score-column", "kl"], ["--score-column", "loss_delta"], []])
def test_text_in_a_score_column_names_the_row(extra, tmp_path, capsys):
    """Before: `unknown score column 'kl'` (asked for), or a silent solve on loss_delta (not asked for)."""
    scores = _with_text(SCORES, 2, "kl", "high")
    code, err = _solve(capsys, tmp_path, scores, COSTS, *extra, "--out", str(tmp_path / "arch.json"))
    assert code == 2 and err == ("puzzle solve: error: scores table: column 'kl' holds non-numbers at row 3 (layer 0, "
                                 "variant 'no_op|swiglu:64'): 'high'; write a number there")
    assert not (tmp_path / "arch.json").exists()


def test_a_score_column_of_words_asked_for_is_not_unknown():
    scores = _frame(SCORES).assign(kl="low")
    with pytest.raises(TableError, match=r"^scores table: column 'kl' holds non-numbers at row 1 \(layer 0, "):
        problem_from_tables(scores, _frame(COSTS), score_column="kl")


def test_text_in_a_cost_column_names_the_row():
    costs = _with_text(COSTS, 4, "decode_ms", "fast")
    with pytest.raises(TableError, match=r"^costs table: column 'decode_ms' holds non-numbers at row 5 \(layer 1, "
                                         r"variant 'gqa:2\|swiglu:64'\): 'fast'"):
        problem_from_tables(_frame(SCORES), _frame(costs), score_column="kl")


def test_a_column_of_words_stays_an_attribute():
    costs = _frame(COSTS).assign(family="llama")
    problem = problem_from_tables(_frame(SCORES), costs, score_column="kl")
    assert problem.candidates[0].attrs["family"] == "llama"


@pytest.mark.parametrize("command, out, message", [
    ("solve", "FILE/x.json", "--out {t}/FILE/x.json: {t}/FILE is a file, not a directory; write elsewhere, "
                             "e.g. --out {t}/x.json"),
    ("solve", "FILE/sub/x.json", "--out {t}/FILE/sub/x.json: {t}/FILE is a file, not a directory"),
    ("frontier", "FILE/f.csv", "--out {t}/FILE/f.csv: {t}/FILE is a file, not a directory"),
])
def test_an_output_under_a_file_says_it_is_a_file(command, out, message, tmp_path, capsys):
    """Before: "the directory FILE does not exist; create it first (mkdir -p FILE)", which mkdir refuses."""
    (tmp_path / "scores.csv").write_text(SCORES)
    (tmp_path / "costs.csv").write_text(COSTS)
    (tmp_path / "FILE").write_text("mine")
    code = main([command, "--scores", str(tmp_path / "scores.csv"), "--costs", str(tmp_path / "costs.csv"),
                 "--score-column", "kl", "--batch", "2", "--context", "10", "--engine", "transformers",
                 "--out", str(tmp_path / out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"puzzle {command}: error: " + message.format(t=tmp_path)), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE", "costs.csv", "scores.csv"]
    assert (tmp_path / "FILE").read_text() == "mine"


def test_a_plot_under_a_file_says_it_is_a_file(tmp_path, capsys):
    (tmp_path / "FILE").write_text("mine")
    (tmp_path / "scores.csv").write_text(SCORES)
    (tmp_path / "costs.csv").write_text(COSTS)
    code = main(["frontier", "--scores", str(tmp_path / "scores.csv"), "--costs", str(tmp_path / "costs.csv"),
                 "--score-column", "kl", "--batch", "2", "--context", "10", "--engine", "transformers",
                 "--out", str(tmp_path / "f.csv"), "--plot", str(tmp_path / "FILE" / "f.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"--plot {tmp_path}/FILE/f.png: {tmp_path}/FILE is a file, not a directory" in err
    assert not (tmp_path / "f.csv").exists()
