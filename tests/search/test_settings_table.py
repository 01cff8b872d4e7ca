"""Settings are declared once (``puzzle/search/settings.py``) and a stage is one object in one file
(``puzzle/search/stages/<name>.py``): a toy setting and a toy stage, registered for the length of a test, reach
the config, its checks, the YAML keys, the flags, the plan, the resource plan, the keys and the run loop with no
other file touched.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import get_type_hints

import pytest

from puzzle.cli.main import main
from puzzle.errors import ConfigError
from puzzle.search import REGISTRY, SearchConfig, resolve
from puzzle.search.context import StageContext
from puzzle.search.resources import StageUse, base_bytes, one_rank, stage_use
from puzzle.search.setting import PLAN, Section, Spec
from puzzle.search.settings import SETTINGS
from puzzle.search.stages import Stage

KIND_TYPES = {"str": str, "strs": tuple, "int": int, "float": float, "bool": bool, "size": str, "mapping": Mapping}


# ------------------------------------------------------------------------------------------ the toy


@dataclass(frozen=True)
class ToySettings(Section):
    toy_rounds: int


class ToyStage(Stage):
    """Counts words of the parent's config after the evaluation: a stage in one class."""

    name, order = "toy", 105
    sections = (ToySettings,)

    def key(self, plan, upstream):
        return {"evaluate": upstream["evaluate"], "rounds": ToySettings.of(plan).toy_rounds}

    def run(self, ctx, directory):
        rounds = ToySettings.of(ctx.plan).toy_rounds
        (directory / "toy.txt").write_text("toy\n" * rounds)
        return {"rounds": rounds, "file": str(directory / "toy.txt")}

    def resources(self, plan, cluster, shapes) -> StageUse:
        seconds = 0.5 * ToySettings.of(plan).toy_rounds
        return stage_use(self.name, "rank 0: a toy", one_rank(cluster, device=base_bytes(cluster), seconds=seconds),
                         cluster)


TOY = Spec(name="toy_rounds", kind="int", stages=("toy",), default=3, advanced=True, at_least=0,
           help="Rounds of the toy stage.")


@pytest.fixture
def toy():
    with SETTINGS.temporary(TOY), REGISTRY.temporary(ToyStage()):
        yield


def _plan_json(capsys, argv):
    capsys.readouterr()
    main(["plan", "--model", "llama-3.2-1b", "--json", *argv])
    return json.loads(capsys.readouterr().out)


def test_a_toy_setting_reaches_config_checks_yaml_flags_and_plan(toy, tmp_path, capsys):
    assert SearchConfig(toy_rounds=5).toy_rounds == 5
    with pytest.raises(ConfigError, match="toy_rounds must be a whole number"):
        SearchConfig(toy_rounds=2.5)
    with pytest.raises(ConfigError, match="toy_rounds must be >= 0, got -1"):
        SearchConfig(toy_rounds=-1)
    (tmp_path / "s.yaml").write_text("model: llama-3.2-1b\nadvanced:\n  toy_rounds: 7\n")
    assert SearchConfig.from_file(tmp_path / "s.yaml").toy_rounds == 7
    doc = _plan_json(capsys, ["--toy-rounds", "4"])
    assert doc["settings"]["toy_rounds"] == {"value": 4, "source": "flag"}
    toy_use = next(s for s in doc["stages"] if s["stage"] == "toy")
    assert toy_use["how"] == "rank 0: a toy" and toy_use["predicted_s"] == 2.0
    assert _plan_json(capsys, ["--config", str(tmp_path / "s.yaml")])["settings"]["toy_rounds"] == {
        "value": 7, "source": "file"}
    default = resolve(SearchConfig(model="llama-3.2-1b"))
    assert default.settings["toy_rounds"].value == 3 and default.settings["toy_rounds"].source == "default"
    assert [s.name for s in REGISTRY.of(default)][-2:] == ["evaluate", "toy"]  # by order: after evaluate


def test_a_toy_setting_with_preset_values_gets_them(tmp_path):
    sized = Spec(name="toy_size", kind="int", stages=("toy",), presets={"quick": 2, "full": 5}, advanced=True,
                 help="A toy stage size, set by the preset.")
    with SETTINGS.temporary(sized):
        quick, full = (resolve(SearchConfig(model="llama-3.2-1b", preset=p)) for p in ("quick", "full"))
        said = resolve(SearchConfig(model="llama-3.2-1b", preset="full", toy_size=7))
    assert (quick.value("toy_size"), full.value("toy_size"), said.value("toy_size")) == (2, 5, 7)
    assert (full.settings["toy_size"].source, said.settings["toy_size"].source) == ("preset", "keyword")


def test_the_toy_flag_is_listed_among_the_advanced_ones(toy, capsys):
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    out = capsys.readouterr().out
    user, advanced = out.split("\nadvanced:\n")

    def flags(text):
        return {line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  --")}

    assert {"--toy-rounds", "--gkd-top-k", "--refine-rounds"} <= flags(advanced)
    assert "Rounds of the toy stage. (default: 3)" in " ".join(advanced.split())
    assert {"--budget", "--model", "--speedup"} <= flags(user)
    assert "--budget" not in flags(advanced) and "--toy-rounds" not in flags(user)


def test_the_toy_stage_is_keyed_by_its_setting_and_runs_skips_and_reruns(toy, tmp_path):
    from puzzle.search.manifest import run_stage

    stage = REGISTRY["toy"]
    three, four = resolve(SearchConfig(model="llama-3.2-1b")), resolve(SearchConfig(model="llama-3.2-1b", toy_rounds=4))
    up = {"evaluate": "E"}
    assert stage.key(three, up) != stage.key(four, up) and stage.key(three, up) == stage.key(three, dict(up))
    runs = []
    for plan in (three, three, four):
        ctx = StageContext(plan, tmp_path, progress=False)
        result = run_stage(tmp_path, stage.name, stage.key(plan, up), lambda d: stage.run(ctx, d), record=stage.record)
        runs.append((result.skipped, result.outputs["rounds"]))
    assert runs == [(False, 3), (True, 3), (False, 4)]
    assert (tmp_path / "toy" / "toy.txt").read_text() == "toy\n" * 4


def test_the_toy_is_gone_after_the_block():
    assert "toy" not in REGISTRY.names() and "toy_rounds" not in SETTINGS
    with pytest.raises(ConfigError, match="unknown key"):
        SearchConfig(toy_rounds=3)


# ------------------------------------------------------------------------------------------ the table


def test_every_setting_names_the_stages_whose_sections_read_it():
    readers: dict[str, set[str]] = {}
    for stage in REGISTRY.all():
        assert stage.sections, f"stage {stage.name} declares no settings section"
        for section in stage.sections:
            for name in section.names():
                assert name in SETTINGS, f"{stage.name}: section {section.__name__} reads {name}, not a setting"
                readers.setdefault(name, set()).add(stage.name)
    for spec in SETTINGS:
        said = set(spec.stages) - {PLAN}
        assert said == readers.get(spec.name, set()), f"{spec.name}: the table says {sorted(said)}, the sections " \
                                                       f"read it in {sorted(readers.get(spec.name, set()))}"
        assert PLAN in spec.stages or said, spec.name


def test_section_fields_have_the_types_of_their_settings():
    plan = resolve(SearchConfig(model="llama-3.2-1b"))
    for stage in REGISTRY.all():
        for section in stage.sections:
            hints = get_type_hints(section)
            values = section.of(plan)
            for f in dataclasses.fields(section):
                kind = KIND_TYPES[SETTINGS[f.name].kind]
                assert isinstance(getattr(values, f.name), kind), (section.__name__, f.name)
                origin = getattr(hints[f.name], "__origin__", hints[f.name])
                assert origin is kind or issubclass(origin, kind), (section.__name__, f.name, hints[f.name])


def test_every_setting_has_one_flag_and_a_help():
    flags = [spec.option for spec in SETTINGS]
    assert len(flags) == len(set(flags))
    for spec in SETTINGS:
        assert spec.help.endswith(".") and len(spec.help) > 20, spec.name
    # a misspelled setting in YAML is one line naming the allowed keys; a user setting under advanced: is refused
    with pytest.raises(ConfigError, match="unknown key"):
        SearchConfig.from_dict({"gkd_stepz": 3})
    with pytest.raises(ConfigError, match="budget is a user setting"):
        SearchConfig.from_dict({"advanced": {"budget": "cpu"}})
    assert SearchConfig.from_dict({"advanced": {"gkd_top_k": 8}}).gkd_top_k == 8


def test_a_new_stage_file_needs_no_registry_line():
    import puzzle.search.stages as package

    files = sorted(p.stem for p in Path(package.__file__).parent.glob("*.py") if p.stem not in ("__init__", "base"))
    assert sorted(REGISTRY.names()) == files
    orders = [s.order for s in REGISTRY.all()]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)


def test_docs_settings_page_is_generated_from_the_table():
    from puzzle.cli.search_flags import settings_markdown

    page = Path(__file__).resolve().parents[2] / "docs" / "settings.md"
    assert page.read_text() == settings_markdown(), \
        "docs/settings.md is out of date: python -m puzzle.cli.search_flags > docs/settings.md"
    assert all(f"`{spec.option}`" in page.read_text() for spec in SETTINGS)


def test_the_child_refit_lives_in_the_table_and_its_stage_file_only():
    """The setting the issue followed through the code: today one row and one stage file, where it was spelled in
    eight places (the config's field, its kind, the preset, the flag, the flag list, the key, the baselines' key
    and the resource model)."""
    root = Path(__file__).resolve().parents[2] / "puzzle"
    files = sorted(str(p.relative_to(root)) for p in [*(root / "search").rglob("*.py"), *(root / "cli").rglob("*.py")]
                   if "child_refit" in p.read_text())
    assert files == ["search/settings.py", "search/stages/child_bld.py"]
