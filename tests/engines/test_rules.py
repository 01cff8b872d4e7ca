"""Every engine row: the table says what the issue's reading of the loaders says, and the search space,
the MIP and the export keep to it (a variant the engine cannot load is never offered, chosen or written)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from block_library.space import SearchSpace
from puzzle.cli.main import main
from puzzle.engines import ENGINE_NAMES, engine_rules, loaders, violations
from puzzle.engines.problem import engine_problem
from puzzle.model import PuzzleConfig, PuzzleForCausalLM
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

# The loaders' capabilities as read from each engine's model file (issue 16's table), written out
# independently of puzzle/engines/rules.py: no_op, linear attention, linear FFN, any FFN width.
ISSUE_TABLE = {
    "vllm": (True, False, False, False),
    "sglang": (True, False, False, False),
    "trtllm": (True, True, True, False),
    "llamacpp": (True, True, False, False),
    "transformers": (True, True, True, True),
}
SPACE = {"attention": {"kv_heads": "fewer"}, "ffn": {"sizes": [0.5, 0.25, 1000], "multiple": 8}}  # 1000: no multiple of 256


def test_the_table_is_the_issues_and_names_its_sources():
    assert set(ENGINE_NAMES) == set(ISSUE_TABLE)
    for name, (no_op, lin_att, lin_ffn, any_width) in ISSUE_TABLE.items():
        r = engine_rules(name)
        assert (r.no_op_attention and r.no_op_ffn, r.linear_attention, r.linear_ffn, r.ffn_multiple is None) == \
            (no_op, lin_att, lin_ffn, any_width), name
        assert r.source and r.title
    assert not engine_rules("sglang").variable_kv_heads and engine_rules("vllm").variable_kv_heads


@pytest.fixture(scope="module")
def shape_1b():
    from puzzle.search.plan import parent_of

    return parent_of("llama-3.2-1b")[0]  # config only: 16 layers, 32 / 8 heads, FFN 8192


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_the_space_offers_only_what_the_engine_loads(engine, shape_1b):
    _, lin_att, lin_ffn, any_width = ISSUE_TABLE[engine]
    space = SearchSpace.from_dict(SPACE)
    full = space.layer_variants(shape_1b.blocks, num_attention_heads=32)
    kept = SearchSpace.from_dict({**SPACE, "engine": engine}).layer_variants(shape_1b.blocks, num_attention_heads=32)
    for lv_full, lv in zip(full, kept):
        kinds = {a.kind for a in lv.attention}
        assert ("linear" in kinds) == lin_att
        assert {f.kind for f in lv.ffn} >= {"swiglu", "no_op"} and ("linear" in {f.kind for f in lv.ffn}) == lin_ffn
        widths = {f.intermediate_size for f in lv.ffn if f.kind == "swiglu"}
        assert widths == ({8192, 4096, 2048, 1000} if any_width else {8192, 4096, 2048})
        kv = {a.num_key_value_heads for a in lv.attention if a.kind == "gqa"}
        assert kv == ({8} if engine == "sglang" else {8, 4, 2, 1})  # SGLang: no variable GQA
        assert lv.attention[0] == lv_full.attention[0] and lv.ffn[0] == lv_full.ffn[0]  # the parent's first
        first_must_attend = engine in ("vllm", "sglang")
        assert ("no_op" in kinds) == (lv.layer > 0 or not first_must_attend)


def test_llamacpp_pairs_a_no_op_ffn_only_with_no_op_attention(shape_1b):
    from puzzle.profiler.table import space_candidates

    per_layer = space_candidates(shape_1b, space=SearchSpace.from_dict({**SPACE, "engine": "llamacpp"}))
    blocks = [b for layer in per_layer for b in layer]
    assert any(b.ffn.kind == "no_op" and b.attention.kind == "no_op" for b in blocks)
    assert not any(b.ffn.kind == "no_op" and b.attention.kind != "no_op" for b in blocks)


def _problem(config):
    """The MIP over every variant of SPACE (no engine), with random scores and real costs on 8xH100."""
    from puzzle.profiler.hardware import parse_target
    from puzzle.profiler.counts import ModelShape
    from puzzle.profiler.table import cost_table, space_candidates
    from solvers import Budget, Scenario
    from solvers.io import problem_from_tables

    candidates = space_candidates(config, space=SearchSpace.from_dict(SPACE))
    sc = Scenario(name="decode", phase="decode", batch=8, length=1024)
    costs = cost_table(ModelShape.from_config(config), candidates, config.blocks, target=parse_target("8xH100"),
                       scenarios=[sc])
    rows = costs[costs.layer >= 0]
    rng = np.random.default_rng(0)
    kl = rng.uniform(0.01, 1, len(rows))
    kl[rows.variant.str.contains("linear|1000").to_numpy()] = 0.001  # cheap in loss: a free optimum picks them
    scores = rows[["layer", "variant", "is_parent"]].assign(kl=np.where(rows.is_parent, 0.0, kl))
    return problem_from_tables(scores, costs, score_column="kl", budget=Budget(speedup=2.0), scenario=sc)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_the_mip_chooses_only_what_the_engine_loads(engine, shape_1b):
    from solvers import solve

    rules = engine_rules(engine)
    problem = _problem(shape_1b)
    restricted = engine_problem(problem, rules)
    assert len(restricted.candidates) < len(problem.candidates) or engine == "transformers"
    blocks = [BlockConfig.from_dict(b) for b in solve(restricted, backend="ortools-mip").block_configs()]
    assert violations(rules, blocks, shape_1b) == []
    if engine in ("vllm", "sglang", "llamacpp"):  # unrestricted, the optimum at 2x takes a linear sub-block
        free = [BlockConfig.from_dict(b) for b in solve(problem, backend="ortools-mip").block_configs()]
        assert violations(rules, free, shape_1b)


def _model_dir(tmp_path, blocks, *, ffn=256, name="m"):
    cfg = PuzzleConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=ffn, block_configs=[b.to_dict() for b in blocks], max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path / name
    PuzzleForCausalLM(cfg).save_pretrained(path)
    return path


G2, G1 = AttentionConfig.gqa(2), AttentionConfig.gqa(1)
S256, S512 = FFNConfig.swiglu(256), FFNConfig.swiglu(512)
MIXED = [BlockConfig(attention=G2, ffn=S256), BlockConfig(attention=AttentionConfig.linear(), ffn=S256),
         BlockConfig(attention=G2, ffn=FFNConfig.linear()), BlockConfig(attention=G1, ffn=FFNConfig.no_op()),
         BlockConfig(attention=AttentionConfig.no_op(), ffn=S512)]
REFUSED_LAYERS = {"vllm": {1, 2}, "sglang": {1, 2}, "trtllm": set(), "llamacpp": {2, 3}, "transformers": set()}


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_export_refuses_a_layer_the_engine_cannot_load_before_writing(engine, tmp_path, capsys):
    src = _model_dir(tmp_path, MIXED)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["export", str(src), "--out", str(out), "--engine", engine])
    refused = REFUSED_LAYERS[engine]
    if refused:
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and not out.exists()
        if engine == "sglang":  # and gqa:1 beside gqa:2: variable GQA
            assert "different KV-head counts [1, 2]" in err
        assert all(f"layer {i}:" in err for i in refused) and engine_rules(engine).title in err
        assert "layer 0:" not in err and "layer 4:" not in err
    else:
        assert code == 0 and (out / "config.json").is_file()
        assert engine in capsys.readouterr().out.split("engines that load it:")[1]


def test_the_default_engine_is_vllm_and_takes_what_it_loads(tmp_path, capsys):
    ok = [BlockConfig(attention=G2, ffn=S256), BlockConfig(attention=G1, ffn=S512),
          BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.swiglu(768)),
          BlockConfig(attention=G2, ffn=FFNConfig.no_op())]
    dirs = {k: _model_dir(tmp_path, blocks, name=k) for k, blocks in (
        ("ok", ok), ("first", [BlockConfig(attention=AttentionConfig.no_op(), ffn=S256)] + ok[1:]),
        ("narrow", [BlockConfig(attention=G2, ffn=FFNConfig.swiglu(96))]))}
    capsys.readouterr()
    assert main(["export", str(dirs["ok"]), "--out", str(tmp_path / "a")]) == 0  # variable KV heads, no-op attention
    assert "engines that load it: vllm, trtllm, transformers" in capsys.readouterr().out  # llama.cpp: no-op FFN
    assert main(["export", str(dirs["first"]), "--out", str(tmp_path / "b")]) == 2
    assert "layer 0: the first layer that is not wholly no-op has no attention" in capsys.readouterr().err
    assert main(["export", str(dirs["narrow"]), "--out", str(tmp_path / "c")]) == 2
    assert "FFN width 96 is not a multiple of 256" in capsys.readouterr().err
    assert main(["export", str(dirs["narrow"]), "--out", str(tmp_path / "d2"), "--engine", "transformers"]) == 0
    assert json.loads((tmp_path / "d2" / "config.json").read_text())["block_configs"][0]["ffn"]["intermediate_size"] == 96


def test_loaders_names_every_engine_for_the_parent_and_fewer_for_a_linear_child(shape_1b):
    assert loaders(shape_1b.blocks, shape_1b) == list(ENGINE_NAMES)
    child = [BlockConfig(attention=AttentionConfig.linear(), ffn=b.ffn) for b in shape_1b.blocks]
    assert loaders(child, shape_1b) == ["trtllm", "llamacpp", "transformers"]
    pd.testing.assert_series_equal(pd.Series(loaders(child, shape_1b)), pd.Series(["trtllm", "llamacpp", "transformers"]))
