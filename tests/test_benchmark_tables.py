"""benchmarks/README.md's tables are the ones benchmarks/tables.py makes from benchmarks/results/*.csv.

When this fails, run ``python benchmarks/tables.py`` and commit the README it rewrites.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import tables

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("page", tables.PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_committed_tables_are_up_to_date(page):
    _, stale = tables.regenerate(page.read_text())
    assert not stale, f"{page}: out of date with their CSVs (run python benchmarks/tables.py): {stale}"


def test_every_committed_results_csv_has_a_table():
    shown = {csv for csv, _ in tables.blocks(tables.README.read_text())}
    csvs = {p.name for p in tables.RESULTS.glob("*.csv") if not p.stem.endswith("_quick")}
    assert csvs <= shown, f"results without a table in benchmarks/README.md: {sorted(csvs - shown)}"


def test_check_fails_on_an_edited_table_and_the_rewrite_mends_it(tmp_path: Path):
    readme = tmp_path / "README.md"
    shutil.copy(tables.README, readme)
    text = readme.read_text()
    start = text.index("<!-- table: frontier.csv -->")
    readme.write_text(text[:start] + text[start:].replace("**0.429**", "**0.400**", 1))
    assert tables.main(["--check", "--readme", str(readme)]) == 1
    assert tables.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == text
    assert tables.main(["--check", "--readme", str(readme)]) == 0


def test_a_changed_csv_makes_the_table_stale(tmp_path: Path):
    results = tmp_path / "results"
    shutil.copytree(tables.RESULTS, results)
    csv = results / "gkd_cache.csv"
    csv.write_text(csv.read_text().replace(",69.6,", ",71.0,"))
    _, stale = tables.regenerate(tables.README.read_text(), results)
    assert stale == ["<!-- table: gkd_cache.csv -->"]


def test_a_table_without_a_function_is_an_error():
    with pytest.raises(KeyError, match="no_such.csv"):
        tables.regenerate("<!-- table: no_such.csv -->\n<!-- end table -->\n")
