"""Reading the documented tables, and `puzzle solve` / `puzzle frontier` end to end."""

from __future__ import annotations

import importlib.util
import json
import re

import pandas as pd
import pytest

from puzzle.cli.main import main
from solvers.errors import TableError
from solvers.io import problem_from_tables, read_problem

PARENT, SMALL, NO_ATTN, FUSED = "gqa:2|swiglu:64", "gqa:1|swiglu:32", "no_op|swiglu:64", "no_op|swiglu:128"
# 3 layers; layers 1-2 can also be one fused run. Decode at batch 2: the parent's step is 3 x 1.0 + 0.5 ms.
SCORES = f"""layer,span,variant,kl,loss_delta
0,1,{PARENT},0.0,0.0
0,1,{SMALL},0.3,0.01
0,1,{NO_ATTN},0.5,0.02
1,1,{PARENT},0.0,0.0
1,1,{SMALL},0.1,0.03
1,1,{NO_ATTN},0.15,0.04
2,1,{PARENT},0.0,0.0
2,1,{SMALL},0.12,0.05
2,1,{NO_ATTN},0.2,0.06
1,2,{FUSED},0.2,0.07
"""
COSTS = """layer,span,variant,params,weight_bytes,kv_bytes_per_token,decode_ms,is_parent
-1,1,fixed,50,100,0,0.5,
""" + "".join(
    f"{layer},1,{v},{p},{2 * p},{kv},{ms},{v == PARENT}\n"
    for layer in range(3) for v, p, kv, ms in ((PARENT, 100, 32, 1.0), (SMALL, 60, 16, 0.6), (NO_ATTN, 80, 0, 0.7))
) + f"1,2,{FUSED},150,300,0,0.9,False\n"


@pytest.fixture
def tables(tmp_path):
    (tmp_path / "scores.csv").write_text(SCORES)
    (tmp_path / "costs.csv").write_text(COSTS)
    return ["--scores", str(tmp_path / "scores.csv"), "--costs", str(tmp_path / "costs.csv"),
            "--score-column", "kl", "--batch", "2", "--context", "10", "--engine", "transformers"]  # toy widths


def test_tables_build_the_documented_problem(tables, tmp_path):
    p = read_problem(tmp_path / "scores.csv", tmp_path / "costs.csv", score_column="kl")
    assert len(p.candidates) == 10 and p.num_layers == 3
    assert p.fixed == {"params": 50.0, "weight_bytes": 100.0, "kv_bytes_per_token": 0.0, "decode_ms": 0.5}
    fused = next(c for c in p.candidates if len(c.layers) == 2)
    assert (fused.id, fused.layers, fused.members) == (f"1-2:{FUSED}+{FUSED}", (1, 2), (FUSED, FUSED))
    assert [p.candidates[i].variant for i in p.parent] == [PARENT] * 3
    pd.read_csv(tmp_path / "costs.csv").to_parquet(tmp_path / "costs.parquet")
    q = read_problem(tmp_path / "scores.csv", tmp_path / "costs.parquet", score_column="loss_delta")
    assert [c.id for c in q.candidates] == [c.id for c in p.candidates]


def test_table_errors_name_the_problem(tmp_path):
    scores, costs = pd.read_csv(pd.io.common.StringIO(SCORES)), pd.read_csv(pd.io.common.StringIO(COSTS))
    with pytest.raises(TableError, match=r"unknown score column 'ppl'; the scores table has \['kl', 'loss_delta'\]"):
        problem_from_tables(scores, costs, score_column="ppl")
    with pytest.raises(TableError, match=r"choose a score column; the scores table has \['kl', 'loss_delta'\]"):
        problem_from_tables(scores, costs)
    without_one = costs[(costs["variant"] != NO_ATTN) | (costs["layer"] != 2)]
    with pytest.raises(TableError, match=r"1 candidate\(s\) are in the scores table but not the costs table, "
                                         r"e.g. \[2, 1, 'no_op\|swiglu:64'\]"):
        problem_from_tables(scores, without_one, score_column="kl")
    with pytest.raises(TableError, match="lists a candidate twice"):
        problem_from_tables(pd.concat([scores, scores.iloc[:1]]), costs, score_column="kl")
    with pytest.raises(TableError, match=r"lacks the key column\(s\) \['variant'\]"):
        problem_from_tables(scores.drop(columns="variant"), costs, score_column="kl")
    with pytest.raises(TableError, match="does not exist"):
        read_problem(tmp_path / "nope.csv", tmp_path / "nope.csv")


def test_solve_writes_block_configs_and_totals(tables, tmp_path, capsys):
    out = tmp_path / "arch.json"
    assert main(["solve", *tables, "--throughput", "800", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["chosen"] == {"0": PARENT, "1": FUSED, "2": FUSED}
    assert data["objective"] == pytest.approx(0.2)
    assert data["block_configs"][0] == {"attention": {"kind": "gqa", "num_key_value_heads": 2},
                                        "ffn": {"kind": "swiglu", "intermediate_size": 64}}
    assert data["fused"] == [{"id": f"1-2:{FUSED}+{FUSED}", "layers": [1, 2], "variants": [FUSED, FUSED]}]
    t = data["totals"]
    # KV cache: 32 bytes per token x batch 2 x (context 10 + the new token)
    assert (t["params"], t["weight_bytes"], t["kv_cache_bytes"], t["memory_bytes"]) == (300, 600, 704, 1304)
    assert t["step_ms"] == pytest.approx(2.4) and t["throughput"] == pytest.approx(2000 / 2.4)
    assert t["speedup"] == pytest.approx(3.5 / 2.4)
    assert data["scenario"] == {"name": "decode", "phase": "decode", "batch": 2, "length": 10, "replicas": 1}
    (con,) = data["constraints"]
    assert con["name"] == "throughput >= 800 tokens/s" and con["slack"] == pytest.approx(2000 / 2.4 - 800)
    assert "wrote" in capsys.readouterr().out
    from puzzle.schema import load_blocks

    assert [b.label for b in load_blocks(out)] == [PARENT, FUSED, FUSED]


def test_solve_with_custom_constraints_and_several_solutions(tables, tmp_path):
    out = tmp_path / "arch.json"
    argv = ["solve", *tables, "--speedup", "1.4", "--constraint", "count(attention != no_op) >= 2",
            "--backend", "cpsat", "--solutions", "3", "--min-diff", "0.3", "--out", str(out)]
    assert main(argv) == 0
    first = json.loads(out.read_text())
    assert first["chosen"] == {"0": SMALL, "1": SMALL, "2": SMALL} and first["objective"] == pytest.approx(0.52)
    second = json.loads((tmp_path / "arch.2.json").read_text())
    assert second["rank"] == 2 and second["objective"] == pytest.approx(0.57)  # layer 1 without attention
    assert (tmp_path / "arch.3.json").exists()


@pytest.mark.parametrize("extra,message", [
    (["--throughput", "5000"], "puzzle solve: error: infeasible: throughput >= 5000 tokens/s: the largest "
                               "achievable throughput is 1000 tokens/s"),
    (["--memory-gib", "1e-7"], "infeasible: memory <= 107.374 bytes: the smallest achievable memory is 560 bytes"),
    (["--score-column", "ppl"], "unknown score column 'ppl'; the scores table has ['kl', 'loss_delta']"),
    (["--constraint", "count(attention = no_op) >= 1"], "unexpected character '=' at position 16"),
    (["--constraint", "count(attention == gqa9) >= 1"],
     "no candidate has attention = gqa9; values: ['gqa:1', 'gqa:2', 'no_op']"),
    (["--constraint", "count(attention == gqa:9) >= 1"], "the largest achievable count(attention == gqa:9) is 0"),
    (["--scenario", "prefill", "--throughput", "10"],
     "scenario 'prefill': no latency column 'prefill_ms'; latency columns: ['decode_ms']"),
])
def test_solve_errors_are_one_line(tables, tmp_path, capsys, extra, message):
    assert main(["solve", *tables, *extra, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def _with_scores(**rows: str) -> str:
    """SCORES with the kl of some rows replaced: ``_with_scores(l1_small="-0.1")``."""
    text = SCORES
    for key, kl in rows.items():
        layer, variant = {"l1_small": ("1,1", SMALL), "l2_small": ("2,1", SMALL), "fused": ("1,2", FUSED)}[key]
        old = next(line for line in text.splitlines() if line.startswith(f"{layer},{variant},"))
        text = text.replace(old, f"{layer},{variant},{kl},{old.rsplit(',', 1)[1]}")
    return text


@pytest.mark.parametrize("kl,shown", [("-0.1", "-0.1"), ("nan", "nan"), ("inf", "inf"), ("-inf", "-inf")])
def test_scores_must_be_finite_and_not_negative(kl, shown):
    costs = pd.read_csv(pd.io.common.StringIO(COSTS))
    scores = pd.read_csv(pd.io.common.StringIO(_with_scores(l1_small=kl, l2_small="-1.0")))
    # the first bad row in table order is named, with its value
    with pytest.raises(TableError, match=rf"^scores table: layer 1, variant '{re.escape(SMALL)}' has "
                                         rf"kl = {shown}; scores must be finite and >= 0"):
        problem_from_tables(scores, costs, score_column="kl")


def test_only_the_chosen_score_column_must_be_non_negative():
    costs = pd.read_csv(pd.io.common.StringIO(COSTS))
    scores = pd.read_csv(pd.io.common.StringIO(_with_scores(fused="-0.2")))
    with pytest.raises(TableError, match=r"layer 1, span 2, variant .* has kl = -0.2;"):
        problem_from_tables(scores, costs, score_column="kl")
    assert problem_from_tables(scores, costs, score_column="loss_delta").score_column == "loss_delta"


def test_solve_refuses_a_negative_score_in_one_line(tables, tmp_path, capsys):
    (tmp_path / "scores.csv").write_text(_with_scores(l1_small="-0.1"))
    out = tmp_path / "x.json"
    assert main(["solve", *tables, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"puzzle solve: error: scores table: layer 1, variant '{SMALL}' has kl = -0.1; scores must be finite and "
        f">= 0 (a quality loss, lower is better): fix the row or choose another score column\n")
    assert not out.exists()


@pytest.mark.parametrize("command,example", [("solve", "arch.json"), ("frontier", "frontier.csv")])
def test_out_must_be_a_file_in_an_existing_directory(tables, tmp_path, capsys, command, example):
    directory, missing = tmp_path / "runs", tmp_path / "missing" / "x.out"
    directory.mkdir()
    # checked before any work: a missing scores table is not what the error is about
    no_tables = ["--scores", str(tmp_path / "absent.csv")]
    assert main([command, *tables, *no_tables, "--out", str(directory)]) == 2
    assert capsys.readouterr().err == (f"puzzle {command}: error: --out {directory} is a directory; give the file "
                                       f"to write, e.g. --out {directory / example}\n")
    assert main([command, *tables, *no_tables, "--out", str(missing)]) == 2
    assert capsys.readouterr().err == (f"puzzle {command}: error: --out {missing}: the directory {missing.parent} "
                                       f"does not exist; create it first (mkdir -p {missing.parent}) or write "
                                       f"elsewhere\n")
    assert list(directory.iterdir()) == [] and not missing.parent.exists()


def test_frontier_writes_table_and_plot(tables, tmp_path, capsys):
    out = tmp_path / "frontier.csv"
    assert main(["frontier", *tables, "--targets", "500,700,800,1000,1300,2000", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert table["status"].tolist() == ["optimal"] * 4 + ["infeasible"] * 2
    assert table["objective"].iloc[:4].tolist() == pytest.approx([0.0, 0.2, 0.2, 0.5])
    assert "the largest achievable throughput is 1000 tokens/s" in table["reason"].iloc[4]
    if importlib.util.find_spec("matplotlib"):
        png = out.with_suffix(".png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["frontier", *tables, "--axis", "memory", "--points", "3", "--out", str(tmp_path / "m.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "m.csv")) == 3


def test_cli_backend_choices_are_the_registry():
    from puzzle.cli.solve_cmd import BACKENDS as CLI_BACKENDS
    from solvers.backends import BACKENDS

    assert sorted(CLI_BACKENDS) == sorted(BACKENDS)


@pytest.mark.parametrize(("extra", "throughput", "kv_bytes", "scenario"), [
    # decode on 2 replicas: a node target of 1600 tokens/s is 800 per replica, so the same choice as above
    (["--throughput", "1600", "--replicas", "2"], 2 * 2 * 1000 / 2.4, 704,
     {"name": "decode", "phase": "decode", "batch": 2, "length": 10, "replicas": 2}),
    # prefill of 10-token prompts: 2 x 10 tokens per step, and the cache holds the 10 prompt tokens
    (["--phase", "prefill", "--throughput", "8000"], 2 * 10 * 1000 / 2.4, 640,
     {"name": "decode", "phase": "prefill", "batch": 2, "length": 10, "replicas": 1}),
])
def test_solve_phase_and_replicas(tables, tmp_path, extra, throughput, kv_bytes, scenario):
    out = tmp_path / "arch.json"
    assert main(["solve", *tables, *extra, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["chosen"] == {"0": PARENT, "1": FUSED, "2": FUSED} and data["scenario"] == scenario
    t = data["totals"]
    assert t["step_ms"] == pytest.approx(2.4) and t["throughput"] == pytest.approx(throughput)
    assert (t["kv_cache_bytes"], t["memory_bytes"]) == (kv_bytes, 600 + kv_bytes)
    assert t["speedup"] == pytest.approx(3.5 / 2.4)


def test_solve_rejects_a_bad_scenario_in_one_line(tables, tmp_path, capsys):
    assert main(["solve", *tables, "--replicas", "0", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "scenario 'decode': replicas must be >= 1, got 0" in err and err.count("\n") == 1
