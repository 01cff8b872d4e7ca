"""Every engine row: the table says what the issue's reading of the loaders says, and the search space,
the MIP and the export keep to it (a variant the engine cannot load is never offered, chosen or written)."""

from __future__ import annotations

import json

import numpy as np
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
        assert (r.no_op_attention, r.no_op_ffn, r.linear_attention, r.linear_ffn, r.ffn_multiple is None) == \
            (no_op, no_op, lin_att, lin_ffn, any_width), name
        assert r.source and r.title
    assert not engine_rules("sglang").variable_kv_heads and engine_rules("vllm").variable_kv_heads


@pytest.fixture(scope="module")
def shape_1b():
    from puzzle.search.resolver import parent_of

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
    if engine == "transformers":
        assert restricted is problem  # it loads every block
    else:
        assert len(restricted.candidates) < len(problem.candidates)
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


def test_a_parent_the_engine_cannot_load_is_refused_before_any_work(tiny_llama_dir, tmp_path, capsys):
    """A parent block (FFN 96) that the MIP may keep: the space, the MIP and the plan all refuse it up front."""
    from puzzle.errors import EngineError
    from puzzle.loading import load_config

    from puzzle.profiler.hardware import parse_target
    from puzzle.profiler.counts import ModelShape
    from puzzle.profiler.table import cost_table, space_candidates
    from solvers import Scenario
    from solvers.io import problem_from_tables

    assert main(["search", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "vLLM cannot load this parent's own blocks (layer 0: FFN width 96 is not a multiple of 256" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    config = load_config(tiny_llama_dir)  # the MIP over a library built for this engine refuses it too
    candidates = space_candidates(config, space=SearchSpace(engine="vllm"))
    sc = Scenario(name="decode", phase="decode", batch=1, length=64)
    costs = cost_table(ModelShape.from_config(config), candidates, config.blocks, target=parse_target("8xH100"),
                       scenarios=[sc])
    scores = costs[costs.layer >= 0][["layer", "variant", "is_parent"]].assign(kl=0.1)
    problem = problem_from_tables(scores, costs, score_column="kl", scenario=sc)
    with pytest.raises(EngineError, match="parent's own layer 0: FFN width 96 is not a multiple of 256"):
        engine_problem(problem, engine_rules("vllm"))


def test_the_mip_filter_needs_no_parent_column_and_transformers_keeps_everything(shape_1b):
    problem = _problem(shape_1b)
    assert engine_problem(problem, engine_rules("transformers")) is problem
    bare = problem.replace(candidates=tuple(c.__class__(id=c.id, layers=c.layers, members=c.members, costs=c.costs,
                                                        scores=c.scores) for c in problem.candidates))
    kept = engine_problem(bare, engine_rules("vllm"))  # no is_parent anywhere: KV heads are not judged
    assert not any("linear" in c.variant for c in kept.candidates)
    assert any(c.variant.startswith("gqa:1|") for c in kept.candidates)


def test_the_baselines_keep_to_the_engine(shape_1b):
    """ShortGPT and attention removal skip a removal the engine's MIP does not offer (no-op attention in layer 0)."""
    from puzzle.search.baselines import remove_in_order

    problem = engine_problem(_problem(shape_1b), engine_rules("vllm")).with_budget(speedup=1.3)
    choice = remove_in_order(problem, "attention_removal", list(range(16)), lambda label: "no_op|" + label.split("|")[1])
    assert choice.feasible and choice.labels[0].startswith("gqa:")
    assert violations(engine_rules("vllm"), [BlockConfig.from_dict(_dict(label)) for label in choice.labels], shape_1b) == []


def _dict(label: str) -> dict:
    from solvers.labels import block_dict

    return block_dict(label)


def test_evaluate_refuses_engine_timing_without_a_parent_before_loading(tiny_llama_dir, capsys, monkeypatch):
    import puzzle.loading

    monkeypatch.setattr(puzzle.loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["evaluate", str(tiny_llama_dir), "--engine", "vllm"]) == 2
    assert "pass --parent" in capsys.readouterr().err


def test_evaluate_engine_prints_and_writes_the_engine_table(tiny_text_parent, tmp_path, capsys, monkeypatch):
    """The CLI's plumbing around the engine timing (the timing itself runs in vLLM in test_vllm.py)."""
    import pandas as pd

    import puzzle.evaluation.engine_speed as es
    from puzzle.engines import vllm

    seen = {}

    def fake(child_dir, parent_dir, scenarios, **kw):
        seen.update(child=child_dir, parent=parent_dir, scenarios=[s.name for s in scenarios], **kw)
        return pd.DataFrame([{"engine": "vllm", "scenario": "decode", "phase": "decode", "batch": 2, "length": 64,
                              "parent_ms": 10.0, "child_ms": 8.0, "engine_speedup": 1.25, "predicted_speedup": 1.3,
                              "ratio": 1.25 / 1.3, "rounds": 2, "target": "cpu"}])

    monkeypatch.setattr(vllm, "require", lambda: None)
    monkeypatch.setattr(es, "engine_speed", fake)
    argv = ["evaluate", str(tiny_text_parent), "--parent", str(tiny_text_parent), "--engine", "vllm", "--rounds", "2",
            "--scenario", "decode:batch=2,context=64", "--sequences", "1", "--seq-len", "32", "--out", str(tmp_path),
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "inside vllm on this device" in out and "1.250" in out
    assert seen["scenarios"] == ["decode"] and seen["rounds"] == 2 and seen["engine"] == "vllm"
    assert pd.read_csv(tmp_path / "engine_speed.csv").engine_speedup.tolist() == [1.25]
