"""Search-space values that produce no variant are refused in one line, before a search writes anything."""

from __future__ import annotations

import pytest

from block_library.space import SearchSpace
from block_library.space_values import check_values
from puzzle.cli.main import main
from puzzle.errors import ConfigError
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig


def parent(layers: int, kv: int, width: int) -> list[BlockConfig]:
    return [BlockConfig(attention=AttentionConfig.gqa(kv), ffn=FFNConfig.swiglu(width))] * layers


TINY = parent(3, 2, 96)  # benchmarks.tiny_parent: 4 query / 2 KV heads, FFN 96
SMOL = parent(4, 3, 1536)  # SmolLM2-135M's shape: 9 query / 3 KV heads, FFN 1536


def refusal(given: dict, blocks: list[BlockConfig] = SMOL, *, engine: str | None = "vllm") -> str:
    with pytest.raises(ConfigError) as e:
        check_values(given, blocks, engine=engine, name="--space")
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("sizes, start", [
    ([0.3], "--space ffn.sizes [0.3]: 0.3 x 96 rounds to 256 with multiple 256, not below the parent's FFN width "
            "96: no pruned width; no multiple of 256 is below 96: set ffn.multiple below it, e.g. multiple: 16"),
    ([37], "--space ffn.sizes [37]: 37 rounds to 256 with multiple 256, not below the parent's FFN width 96"),
    ([0.5, 1.0], "--space ffn.sizes [0.5, 1.0]: 0.5 x 96 rounds to 256"),  # the first size that gives nothing
])
def test_sizes_that_round_onto_the_parent_are_refused(sizes, start):
    assert refusal({"ffn": {"sizes": sizes}}, TINY, engine="transformers").startswith(start)


def test_a_width_the_engine_drops_is_refused_with_the_widths_it_loads():
    message = refusal({"ffn": {"sizes": [0.5, 0.3], "multiple": 32}})
    assert message == ("--space ffn.sizes [0.5, 0.3]: 0.3 x 1536 rounds to 448 with multiple 32, and vLLM loads only "
                       "FFN widths that are multiples of 256 (ffn_mult): no pruned width; choose sizes that round to "
                       "1280, 1024, 768, 512, ... (ffn.multiple: 256)")
    # the same multiple alone: the default ratios under it are what gives nothing
    assert refusal({"ffn": {"multiple": 32}}).startswith("--space ffn.multiple 32: 0.875 x 1536 rounds to 1344")


def test_explicit_kv_heads_and_override_variants_the_engine_drops_are_refused():
    assert refusal({"attention": {"kv_heads": [1]}}, engine="sglang").startswith(
        "--space attention.kv_heads [1]: SGLang does not load gqa:1 (1 KV heads where the parent has 3")
    assert refusal({"overrides": [{"layers": [0], "attention": ["no_op"]}]}).startswith(
        "--space overrides layers [0]: vLLM does not load no_op there (no-op attention in layer 0")
    assert refusal({"overrides": [{"layers": [1, 2], "ffn": ["swiglu:1000"]}]}).startswith(
        "--space overrides layers [1, 2]: vLLM does not load swiglu:1000 there (FFN width 1000 is not a multiple")


@pytest.mark.parametrize("given, engine", [
    ({"ffn": {"sizes": [0.5, 0.25]}}, "vllm"),                  # 768 and 384 -> 256: both load
    ({"ffn": {"sizes": [0.5, 0.49]}}, "vllm"),                  # the same width twice is one variant, not none
    ({"ffn": {"sizes": [0.3], "multiple": 32}}, None),          # 448: any engine-free space takes it
    ({"attention": {"kv_heads": [3]}}, "sglang"),               # the parent's own count
    ({"overrides": [{"layers": [0], "attention": ["parent"], "ffn": ["swiglu:1536", "no_op"]}]}, "vllm"),
    ({"overrides": [{"layers": [0, 1], "attention": ["no_op"]}]}, "vllm"),  # layer 1 takes it
    ({}, "vllm"),
])
def test_values_that_give_a_variant_pass(given, engine):
    check_values(given, SMOL, engine=engine)


def test_the_default_space_is_not_checked_on_a_small_parent():
    """The default ratios give no width below 96 at multiple 256; the user wrote none of them, so nothing to refuse
    (the layer keeps its parent FFN, linear and no-op)."""
    check_values({"attention": {"linear": False}}, TINY, engine="transformers")
    lv = SearchSpace().layer_variants(TINY, num_attention_heads=4)[0]
    assert [f.label for f in lv.ffn] == ["swiglu:96", "linear", "no_op"]


@pytest.mark.parametrize("kv, start", [
    ([-1], "space.attention.kv_heads [-1] holds -1: each KV-head count must be a positive divisor of the query-head "
           "count"),
    ([2, 0], "space.attention.kv_heads [2, 0] holds 0: each KV-head count must be a positive divisor"),
])
def test_a_negative_kv_head_count_says_it_must_be_a_positive_divisor(kv, start):
    with pytest.raises(ConfigError) as e:
        SearchSpace.from_dict({"attention": {"kv_heads": kv}})
    assert str(e.value).startswith(start) and "choose one of []" not in str(e.value)


def test_a_negative_query_head_count_names_the_config_field():
    with pytest.raises(ConfigError, match=r"^layer 0: the parent has -4 query heads; num_attention_heads in its "
                                          r"config.json must be a positive integer$"):
        SearchSpace().layer_variants(TINY, num_attention_heads=-4)


@pytest.mark.parametrize("text, start", [
    ("space: {ffn: {sizes: [0.3]}}\n", "puzzle search: error: --space ffn.sizes [0.3]: 0.3 x 96 rounds to 256"),
    ("space: {ffn: {sizes: [37]}}\n", "puzzle search: error: --space ffn.sizes [37]: 37 rounds to 256"),
    ("{attention: {kv_heads: [-1]}}\n", "puzzle search: error: space.attention.kv_heads [-1] holds -1: each KV-head "
                                        "count must be a positive divisor"),
])
def test_search_refuses_before_writing(text, start, tiny_text_parent, tmp_path, capsys):
    (tmp_path / "space.yaml").write_text(text)
    out = tmp_path / "run"
    code = main(["search", "--no-progress", "--model", str(tiny_text_parent), "--engine", "transformers",
                 "--budget", "cpu", "--space", str(tmp_path / "space.yaml"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(start) and "\n" not in err, err
    assert not out.exists()
    assert main(["plan", "--model", str(tiny_text_parent), "--engine", "transformers", "--budget", "cpu",
                 "--space", str(tmp_path / "space.yaml"), "--out", str(out)]) == 2  # the plan says so too
    assert not out.exists()
