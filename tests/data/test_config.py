from __future__ import annotations

import pytest

from puzzle.data import DataConfig
from puzzle.errors import ConfigError


def test_defaults_and_round_trip():
    cfg = DataConfig()
    assert cfg.sources == ("stdlib",) and cfg.seq_len == 256 and cfg.val_fraction == 0.05
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_normalizes_sources():
    cfg = DataConfig.from_dict({"sources": ["a.txt", "corpus/"], "seq_len": 64, "val_fraction": 0.1})
    assert cfg.sources == ("a.txt", "corpus/")
    assert DataConfig.from_dict({"sources": "stdlib"}).sources == ("stdlib",)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['seqlen'\].*seq_len"):
        DataConfig.from_dict({"seqlen": 128})


@pytest.mark.parametrize("kwargs, field", [
    ({"seq_len": 1}, "seq_len"), ({"seq_len": 3.0}, "seq_len"), ({"seq_len": True}, "seq_len"),
    ({"val_fraction": 0.0}, "val_fraction"), ({"val_fraction": 1.0}, "val_fraction"),
    ({"val_fraction": "0.1"}, "val_fraction"), ({"sources": ()}, "sources"), ({"sources": ("",)}, "sources"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"data.{field}"):
        DataConfig(**kwargs)
