"""The cost table on SmolLM2's real config and a tiny library, the MIP reading it, and `puzzle profile`."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from puzzle.cli.main import main
from puzzle.profiler.counts import ModelShape
from puzzle.profiler.hardware import DEFAULT_TARGET, parse_target
from puzzle.profiler.roofline import model_ms
from puzzle.profiler.scenario import Scenario, default_scenarios, parse_scenario
from puzzle.profiler.table import cost_table, layer_candidates, model_totals
from puzzle.schema import BlockConfig
from tests.conftest import requires_smollm2


@pytest.fixture(scope="module")
def smollm2_costs(smollm2_source):
    config, candidates = layer_candidates("smollm2-135m")
    scenarios = default_scenarios()
    table = cost_table(ModelShape.from_config(config), candidates, config.blocks,
                       target=parse_target("8xH100"), scenarios=scenarios)
    return config, candidates, scenarios, table


@requires_smollm2
def test_smollm2_table_covers_the_default_space_and_sums_to_the_parent(smollm2_costs, smollm2):
    config, candidates, scenarios, table = smollm2_costs
    body = table[table.layer >= 0]
    assert len(body) == 30 * 4 * 8 and body.groupby("layer").size().eq(32).all()
    assert body.groupby("layer").is_parent.sum().eq(1).all()
    assert set(body[body.is_parent].variant) == {"gqa:3|swiglu:1536"}
    totals = model_totals(table, config.blocks, scenarios)
    assert totals["params"] == sum(p.numel() for p in smollm2.parameters())  # tied head counted once
    shape, target = ModelShape.from_config(config), parse_target("8xH100")
    for sc in scenarios:
        assert totals[sc.column] == pytest.approx(model_ms(shape, config.blocks, sc, target), rel=1e-12)
    noop = body[body.variant == "no_op|no_op"].iloc[0]
    assert noop.params == noop.weight_bytes == noop.kv_bytes_per_token == noop.decode_ms == 0


@requires_smollm2
def test_the_mip_reads_the_table_and_its_totals_match_the_profiler(smollm2_costs):
    from solvers import solve
    from solvers.constraints import Budget
    from solvers.io import problem_from_tables

    config, _, scenarios, table = smollm2_costs
    body = table[table.layer >= 0]
    # proxy quality loss (a stand-in for `puzzle score`): what a variant removes, in parameters
    scores = body[["layer", "variant", "is_parent"]].assign(proxy=1.0 - body.params / body.params.max())
    decode = next(s for s in scenarios if s.name == "decode")
    problem = problem_from_tables(scores, table, scenario=decode, budget=Budget(speedup=1.5))  # the same type
    solution = solve(problem)
    assert solution.totals.speedup >= 1.5 - 1e-9
    shape, target = ModelShape.from_config(config), parse_target("8xH100")
    assert solution.totals.parent_step_ms == pytest.approx(model_ms(shape, config.blocks, decode, target), rel=1e-9)
    # the chosen architecture, rebuilt as block configs, costs what the MIP says it costs
    blocks = config.with_blocks([BlockConfig.from_dict(d) for d in solution.block_configs()]).blocks
    assert solution.totals.step_ms == pytest.approx(model_ms(shape, blocks, decode, target), rel=1e-9)
    assert blocks != config.blocks


def test_unknown_target_fails_with_the_list(capsys, tiny_llama_dir, tmp_path):
    assert main(["profile", str(tiny_llama_dir), "--target", "8xH800", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "unknown accelerator 'H800'" in err and "H100-SXM" in err and "B200" in err and "cpu" in err
    assert not (tmp_path / "p").exists()
    assert main(["profile", str(tiny_llama_dir), "--target", "1xA100", "--dtype", "fp8",
                 "--out", str(tmp_path / "p")]) == 2
    assert "A100-80GB does not support fp8" in capsys.readouterr().err


def test_profile_cli_defaults_to_the_one_default_target(capsys, tiny_llama_dir, tmp_path):
    assert main(["profile", str(tiny_llama_dir), "--out", str(tmp_path / "costs")]) == 0
    deployment = json.loads((tmp_path / "costs" / "profile.json").read_text())["deployment"]
    assert parse_target(DEFAULT_TARGET).to_dict()["count"] == deployment["count"] == 8
    # one node of eight H100s; the tiny model fits one, so the other seven serve replicas
    assert (deployment["accelerator"], deployment["tensor_parallel"], deployment["replicas"]) == ("H100-SXM", 1, 8)
    assert "8xH100-SXM:tp1:bf16" in capsys.readouterr().out


def test_profile_cli_writes_a_table_the_solver_reads(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "costs"
    assert main(["profile", str(tiny_llama_dir), "--target", "2xH200", "--dtype", "fp8",
                 "--scenario", "decode:batch=4,context=512", "--scenario", "p=prefill:batch=1,prompt=128",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2xH200:tp1:fp8" in printed and "parent, decode" in printed  # 4 heads, 2 KV heads: tp 1 fits
    table = pd.read_csv(out / "costs.csv")
    assert {"decode_ms", "p_ms", "params", "weight_bytes", "kv_bytes_per_token", "is_parent"} <= set(table.columns)
    meta = json.loads((out / "profile.json").read_text())
    assert meta["target"] == "2xH200:tp1:fp8" and meta["deployment"]["replicas"] == 2 and meta["candidates"] == int((table.layer >= 0).sum())
    assert meta["scenarios"][0] == {"name": "decode", "phase": "decode", "batch": 4, "length": 512, "replicas": 2}
    assert Scenario.from_dict(meta["scenarios"][1]) == parse_scenario("p=prefill:batch=1,prompt=128,replicas=2")
    # fp8 halves GEMM weight bytes relative to bf16 (norms stay 16-bit)
    bf16 = tmp_path / "bf16"
    assert main(["profile", str(tiny_llama_dir), "--target", "2xH200", "--out", str(bf16)]) == 0
    t16 = pd.read_csv(bf16 / "costs.csv").set_index(["layer", "variant"])
    t8 = table.set_index(["layer", "variant"])
    row = (0, t8[t8.is_parent].index[0][1])
    assert t8.loc[row, "weight_bytes"] < 0.55 * t16.loc[row, "weight_bytes"]
