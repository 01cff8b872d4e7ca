"""Architecture schema: validation errors name what to fix; JSON/YAML round trips."""

from __future__ import annotations

import json

import pytest

from puzzle.errors import SchemaError
from puzzle.model import PuzzleConfig
from puzzle.schema import (AttentionConfig, BlockConfig, FFNConfig, blocks_from_list, load_blocks, save_blocks,
                           validate_blocks)

BLOCKS = [
    BlockConfig(attention=AttentionConfig.gqa(3), ffn=FFNConfig.swiglu(1536)),
    BlockConfig(attention=AttentionConfig.linear(), ffn=FFNConfig.no_op()),
    BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.linear()),
    BlockConfig(attention=AttentionConfig.gqa(1), ffn=FFNConfig.swiglu(256)),
]


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "mamba"}, "attention kind 'mamba' is not one of"),
    ({"kind": "gqa"}, "num_key_value_heads must be a positive integer, got None"),
    ({"kind": "gqa", "num_key_value_heads": 0}, "positive integer, got 0"),
    ({"kind": "gqa", "num_key_value_heads": True}, "positive integer, got True"),
    ({"kind": "gqa", "num_key_value_heads": 2.0}, "positive integer, got 2.0"),
    ({"kind": "no_op", "num_key_value_heads": 2}, "no_op attention has no KV heads"),
])
def test_attention_validation(kwargs, match):
    with pytest.raises(SchemaError, match=match):
        AttentionConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "moe"}, "ffn kind 'moe' is not one of"),
    ({"kind": "swiglu"}, "intermediate_size must be a positive integer"),
    ({"kind": "swiglu", "intermediate_size": -5}, "got -5"),
    ({"kind": "linear", "intermediate_size": 64}, "linear ffn has no intermediate size"),
])
def test_ffn_validation(kwargs, match):
    with pytest.raises(SchemaError, match=match):
        FFNConfig(**kwargs)


def test_kv_heads_must_divide_query_heads_and_error_lists_divisors():
    bad = [BLOCKS[0], BlockConfig(attention=AttentionConfig.gqa(2), ffn=FFNConfig.no_op())]
    with pytest.raises(SchemaError, match=r"layer 1: num_key_value_heads=2 must divide the 9 query heads; choose one of \[1, 3, 9\]"):
        validate_blocks(bad, num_attention_heads=9)
    with pytest.raises(SchemaError, match="layer 1"):
        PuzzleConfig(hidden_size=576, num_attention_heads=9, block_configs=[b.to_dict() for b in bad])


def test_unknown_and_missing_keys_are_named():
    with pytest.raises(SchemaError, match=r"layer 1: attention config: unknown key\(s\) \['heads'\]"):
        blocks_from_list([BLOCKS[0].to_dict(), {"attention": {"kind": "gqa", "heads": 3}, "ffn": {"kind": "no_op"}}])
    with pytest.raises(SchemaError, match=r"missing \['ffn'\]"):
        blocks_from_list([{"attention": {"kind": "no_op"}}])
    with pytest.raises(SchemaError, match="must be a list"):
        blocks_from_list({"attention": {}})


def test_labels():
    assert [b.label for b in BLOCKS] == ["gqa:3|swiglu:1536", "linear|no_op", "no_op|linear", "gqa:1|swiglu:256"]


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_file_round_trip(tmp_path, suffix):
    path = tmp_path / f"arch{suffix}"
    save_blocks(BLOCKS, path)
    assert load_blocks(path) == BLOCKS
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left


def test_bare_list_json_is_accepted(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([b.to_dict() for b in BLOCKS]))
    assert load_blocks(path) == BLOCKS


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(SchemaError, match="does not exist"):
        load_blocks(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(SchemaError, match="bad.json is not valid json"):
        load_blocks(tmp_path / "bad.json")
    (tmp_path / "keys.yaml").write_text("layers: []\n")
    with pytest.raises(SchemaError, match=r"expected a 'block_configs' key, found \['layers'\]"):
        load_blocks(tmp_path / "keys.yaml")


def test_config_round_trip_keeps_blocks(tmp_path):
    config = PuzzleConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                          block_configs=[b.to_dict() for b in BLOCKS])
    config.save_pretrained(tmp_path)
    again = PuzzleConfig.from_pretrained(tmp_path)
    assert again.blocks == BLOCKS and again.num_hidden_layers == 4
    assert config.with_blocks(BLOCKS[:2]).num_hidden_layers == 2
    with pytest.raises(SchemaError, match="num_hidden_layers=3 but 4 block configs"):
        PuzzleConfig(hidden_size=576, num_attention_heads=9, num_hidden_layers=3, block_configs=[b.to_dict() for b in BLOCKS])
