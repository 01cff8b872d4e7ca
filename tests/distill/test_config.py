"""GKDConfig: defaults, validation, dict and YAML round trips, unknown keys."""

from __future__ import annotations

import pytest

from puzzle.distill import GKDConfig
from puzzle.errors import ConfigError


def test_defaults_and_round_trip(tmp_path):
    cfg = GKDConfig()
    assert (cfg.seq_len, cfg.batch, cfg.steps, cfg.lr, cfg.hidden) == (256, 4, 32, 1e-4, "final")
    assert (cfg.kl_weight, cfg.cosine_weight, cfg.lm_weight) == (1.0, 1.0, 0.0)
    assert cfg.train_sequences == 128
    assert GKDConfig.from_dict(cfg.to_dict()) == cfg
    assert "checkpoint_every" not in cfg.identity()
    (tmp_path / "gkd.yaml").write_text("steps: 8\nsources: [stdlib]\nhidden: all\nlr: 5.0e-5\n")
    loaded = GKDConfig.from_file(tmp_path / "gkd.yaml")
    assert (loaded.steps, loaded.sources, loaded.hidden, loaded.lr) == (8, ("stdlib",), "all", 5e-5)


@pytest.mark.parametrize("changes, message", [
    ({"stepz": 3}, r"unknown key\(s\) \['stepz'\]"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"batch": 2.5}, "batch must be an integer"),
    ({"lr": 0}, "lr must be a number > 0"),
    ({"warmup_fraction": 1.5}, "warmup_fraction must be a number >= 0.0 and <= 1.0"),
    ({"kl_weight": -1}, "kl_weight must be a number >= 0"),
    ({"kl_weight": 0, "cosine_weight": 0}, "nothing to train on"),
    ({"hidden": "middle"}, "hidden must be one of"),
    ({"sources": []}, "sources must be a non-empty list"),
    ({"seq_len": 1}, "seq_len must be an integer >= 2"),
])
def test_bad_values_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        GKDConfig.from_dict(changes)


def test_a_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        GKDConfig.from_file(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("steps: 3\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: GKD config: unknown key\(s\) \['bogus'\]"):
        GKDConfig.from_file(tmp_path / "bad.yaml")
