"""The search space: defaults for SmolLM2 and Llama-3.1-8B shapes, rounding, overrides, errors."""

from __future__ import annotations

import pytest

from block_library import LibraryConfig, SearchSpace
from block_library.space import FFNSpace
from puzzle.errors import ConfigError
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig


def parent(n: int, kv: int, m: int) -> list[BlockConfig]:
    return [BlockConfig(attention=AttentionConfig.gqa(kv), ffn=FFNConfig.swiglu(m))] * n


def labels(lv):
    return [a.label for a in lv.attention], [f.label for f in lv.ffn]


def test_default_space_smollm2_shape():
    lvs = SearchSpace().layer_variants(parent(30, 3, 1536), num_attention_heads=9)
    assert len(lvs) == 30
    att, ffn = labels(lvs[7])
    assert att == ["gqa:3", "gqa:1", "linear", "no_op"]
    assert ffn == ["swiglu:1536", "swiglu:1280", "swiglu:1024", "swiglu:768", "swiglu:512", "swiglu:256", "linear", "no_op"]


def test_default_space_llama_8b_shape():
    (lv,) = SearchSpace().layer_variants(parent(1, 8, 14336), num_attention_heads=32)
    att, ffn = labels(lv)
    assert att == ["gqa:8", "gqa:4", "gqa:2", "gqa:1", "linear", "no_op"]
    widths = [int(f.split(":")[1]) for f in ffn if f.startswith("swiglu")]
    assert widths == [14336, 12544, 10752, 8960, 7168, 5376, 3584, 1792]
    assert all(w % 256 == 0 for w in widths)


@pytest.mark.parametrize("sizes, multiple, want", [
    ((0.5,), 256, [768]),
    ((0.75,), 256, [1024]),        # 1152 is 4.5 multiples: ties round down
    ((1000,), 256, [1024]),        # absolute width, nearest multiple
    ((0.01,), 256, [256]),         # never below one multiple
    ((1.0, 2000), 256, []),        # the parent's width or wider: not a smaller variant
    ((0.5, 0.5, 768), 256, [768]),  # duplicates collapse
    ((0.3,), 1, [461]),            # 460.8
])
def test_ffn_width_rounding(sizes, multiple, want):
    assert FFNSpace(sizes=sizes, multiple=multiple).widths(1536) == want


def test_overrides_replace_defaults_and_keep_the_parent():
    space = SearchSpace.from_dict({"overrides": [
        {"layers": [0], "attention": ["parent"]},
        {"layers": "2-3", "ffn": ["swiglu:1024", "no_op"]},
    ]})
    lvs = space.layer_variants(parent(4, 3, 1536), num_attention_heads=9)
    assert labels(lvs[0])[0] == ["gqa:3"]
    assert labels(lvs[1])[0] == ["gqa:3", "gqa:1", "linear", "no_op"]
    assert labels(lvs[2])[1] == ["swiglu:1536", "swiglu:1024", "no_op"]  # parent always first
    assert labels(lvs[3])[1] == ["swiglu:1536", "swiglu:1024", "no_op"]
    assert SearchSpace.from_dict(space.to_dict()) == space


@pytest.mark.parametrize("data, match", [
    ({"attention": {"kv_head": 1}}, r"unknown key\(s\) \['kv_head'\]"),
    ({"ffn": {"sizes": [0.5, "half"]}}, "neither a ratio"),
    ({"ffn": {"multiple": 0}}, "positive integer"),
    ({"overrides": [{"layers": [1], "ffn": ["swiglu"]}]}, "swiglu:WIDTH"),
    ({"overrides": [{"attention": ["no_op"]}]}, "needs 'layers'"),
    ({"attention": {"kv_heads": "many"}}, "'fewer' or a list"),
])
def test_bad_space_is_a_clear_error(data, match):
    with pytest.raises(ConfigError, match=match):
        SearchSpace.from_dict(data)


def test_errors_that_need_the_parent():
    with pytest.raises(ConfigError, match=r"out of range; the parent has layers 0..3"):
        SearchSpace.from_dict({"overrides": [{"layers": [9], "attention": ["no_op"]}]}).layer_variants(
            parent(4, 3, 1536), num_attention_heads=9)
    with pytest.raises(ConfigError, match=r"gqa:2 must divide the 9 query heads; choose one of \[1, 3, 9\]"):
        SearchSpace.from_dict({"attention": {"kv_heads": [2]}}).layer_variants(parent(1, 3, 1536), num_attention_heads=9)


def test_library_config_yaml_roundtrip_and_unknown_keys(tmp_path):
    cfg = LibraryConfig.from_dict({"bld": {"tokens": 4096, "lr": 3e-4}, "data": {"seq_len": 128}})
    assert LibraryConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.sha256() != LibraryConfig().sha256()
    p = tmp_path / "c.yaml"
    p.write_text("bld:\n  tokenz: 5\n")
    with pytest.raises(ConfigError, match=r"c.yaml: bld: unknown key\(s\) \['tokenz'\]"):
        LibraryConfig.from_file(p)
    with pytest.raises(ConfigError, match="bld.lr"):
        LibraryConfig.from_dict({"bld": {"lr": -1}})
