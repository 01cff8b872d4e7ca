"""``puzzle search`` flags: --constraint, --baselines and --calibrate reach the config; a bad constraint is one line."""

from __future__ import annotations

import pytest

from puzzle.cli.main import build_parser, main
from puzzle.cli.search_cmd import config_from_args


def _config(*argv: str):
    return config_from_args(build_parser().parse_args(["search", *argv]))


def test_flags_parse_into_the_config():
    cfg = _config("--constraint", "layer[0] == parent", "--constraint", "count(attention != no_op) >= 2",
                  "--baselines", "uniform_ffn", "shortgpt", "--no-calibrate", "--budget", "cpu")
    assert cfg.constraints == ("layer[0] == parent", "count(attention != no_op) >= 2")
    assert cfg.baselines == ("uniform_ffn", "shortgpt") and cfg.calibrate is False
    plain = _config()
    assert plain.given() == []  # nothing said: the plan fills in every default
    assert _config("--calibrate").calibrate is True and _config("--budget", "cpu").calibrate is None


def test_flags_replace_the_config_file_and_a_new_budget_rederives_calibrate(tmp_path):
    (tmp_path / "s.yaml").write_text("budget: cpu\nconstraints: ['layer[1] == parent']\nbaselines: [shortgpt]\n")
    from_file = _config("--config", str(tmp_path / "s.yaml"))
    assert (from_file.constraints, from_file.baselines, from_file.calibrate) == (("layer[1] == parent",),
                                                                                  ("shortgpt",), None)
    cfg = _config("--config", str(tmp_path / "s.yaml"), "--constraint", "layer[0] == parent", "--budget", "8xH100")
    assert cfg.constraints == ("layer[0] == parent",) and cfg.baselines == ("shortgpt",) and cfg.calibrate is None
    assert (cfg.origin["constraints"], cfg.origin["baselines"]) == ("flag", "file")


def test_an_unknown_baseline_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["search", "--baselines", "magnitude"])
    assert e.value.code == 2 and "invalid choice: 'magnitude'" in capsys.readouterr().err


def test_a_bad_constraint_exits_2_with_one_line_before_any_stage(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "--out", str(out), "--constraint", "count(attention != no_op >= 3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("puzzle search: error: constraint ") and "position" in err
    assert not out.exists()
