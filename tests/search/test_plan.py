"""The plan: one resolve step, one merge rule, one parsed target with a valid tensor-parallel degree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from puzzle.cli.main import main
from puzzle.errors import ConfigError, UnknownTargetError
from puzzle.profiler.counts import ModelShape
from puzzle.profiler.deployment import memory_per_device, valid_tensor_parallel
from puzzle.search import SearchConfig, resolve
from puzzle.search.settings import SETTINGS

SMOLLM2_SHAPE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                 "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                 "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True, "hidden_act": "silu"}
LLAMA_70B_SHAPE = {**SMOLLM2_SHAPE, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                   "tie_word_embeddings": False}


def shape_dir(tmp_path: Path, config: dict, name: str = "shape") -> Path:
    """A model directory holding only ``config.json``: enough to plan."""
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture
def smol_shape(tmp_path) -> str:
    return str(shape_dir(tmp_path, SMOLLM2_SHAPE))


# ------------------------------------------------------------------------------------- the target


def test_1xcpu_is_the_cpu_target_everywhere(smol_shape, fake_cpu_peaks):
    cpu, one = resolve(SearchConfig(model=smol_shape, budget="cpu")), resolve(SearchConfig(model=smol_shape,
                                                                                          budget="1xcpu"))
    for plan in (cpu, one):
        assert plan.target.is_cpu and plan.target.tp == 1 and plan.target.replicas == 1
        assert plan.value("calibrate") is True and plan.settings["calibrate"].source == "derived"
        assert plan.value("fuse_threshold") == 0.0 and plan.value("dtype") == "fp32"
    assert {k: v for k, v in one.values().items() if k != "budget"} == {k: v for k, v in cpu.values().items()
                                                                        if k != "budget"}
    with pytest.raises(UnknownTargetError, match="one machine"):
        resolve(SearchConfig(model=smol_shape, budget="2xcpu"))


def test_8xh100_serves_smollm2_with_a_tensor_parallel_degree_engines_accept(smol_shape):
    plan = resolve(SearchConfig(model=smol_shape, budget="8xH100"))
    # 9 query heads and 3 KV heads split evenly only 1, 3 or 9 ways; the smallest that fits is 1
    assert valid_tensor_parallel(8, num_attention_heads=9, blocks=[]) == [1, 3]
    assert (plan.target.count, plan.target.tp, plan.target.replicas) == (8, 1, 8)
    assert plan.settings["tp"].source == "derived"
    three = resolve(SearchConfig(model=smol_shape, budget="8xH100", tp=3))
    assert (three.target.tp, three.target.replicas) == (3, 2)
    with pytest.raises(UnknownTargetError, match="valid degrees: 1, 3"):
        resolve(SearchConfig(model=smol_shape, budget="8xH100", tp=8))


def test_a_70b_parent_gets_the_smallest_degree_that_fits(tmp_path):
    plan = resolve(SearchConfig(model=str(shape_dir(tmp_path, LLAMA_70B_SHAPE)), budget="8xH100"))
    from puzzle.loading import load_config

    cfg = load_config(plan.parent["directory"])
    shape, limit = ModelShape.from_config(cfg), 0.9 * 80e9
    need = {tp: memory_per_device(shape, cfg.blocks, dtype="bf16", tp=tp, batch=8, kv_tokens=1025)
            for tp in (1, 2, 4, 8)}  # decode at context 1024 holds 1025 tokens
    assert plan.target.tp == min(tp for tp, b in need.items() if b <= limit)
    assert need[plan.target.tp] <= limit < need[plan.target.tp // 2]
    assert plan.target.replicas == 8 // plan.target.tp


def test_throughput_counts_every_replica(smol_shape):
    one = resolve(SearchConfig(model=smol_shape, budget="1xH100"))
    eight = resolve(SearchConfig(model=smol_shape, budget="8xH100"))
    assert eight.budget_scenario.replicas == 8 and one.budget_scenario.replicas == 1
    assert eight.feasibility.max_throughput == pytest.approx(8 * one.feasibility.max_throughput)
    assert eight.feasibility.max_speedup == pytest.approx(one.feasibility.max_speedup)


# ---------------------------------------------------------------------------------- the scenario


def test_prefill_budget_costs_and_constrains_the_same_batch(smol_shape):
    from puzzle.profiler.roofline import model_ms

    plan = resolve(SearchConfig(model=smol_shape, scenario="prefill", batch=4, context=512))
    sc = plan.budget_scenario
    assert (sc.phase, sc.batch, sc.length, sc.column) == ("prefill", 4, 512, "prefill_ms")
    assert [s.phase for s in plan.scenarios] == ["prefill", "decode"]
    from puzzle.loading import load_config

    cfg = load_config(plan.parent["directory"])
    parent_ms = model_ms(ModelShape.from_config(cfg), cfg.blocks, sc, plan.target)
    assert plan.feasibility.parent_ms == pytest.approx(parent_ms, rel=1e-9)
    # batch 4 prompts cost more than 1: the budget's batch is the costed one
    one = resolve(SearchConfig(model=smol_shape, scenario="prefill", batch=1, context=512))
    assert plan.feasibility.parent_ms > 2 * one.feasibility.parent_ms


# ------------------------------------------------------------------------------------- merging


def test_yaml_speedup_survives_a_memory_flag_and_a_memory_keyword(tmp_path, smol_shape, capsys):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"model": smol_shape, "speedup": 2.0}))
    main(["plan", "--config", str(path), "--memory", "20", "--json", "--out", str(tmp_path / "r")])
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"]["speedup"] == {"value": 2.0, "source": "file"}
    assert doc["settings"]["memory"] == {"value": 20.0, "source": "flag"}
    api = resolve(SearchConfig.from_file(path).merge({"memory": 20}))
    assert (api.value("speedup"), api.value("memory")) == (2.0, 20.0)


def test_an_explicit_value_equal_to_a_default_is_kept_across_a_preset_change(smol_shape):
    cfg = SearchConfig(model=smol_shape, gkd_steps=16).merge({"preset": "full"})
    plan = resolve(cfg)
    assert plan.value("gkd_steps") == 16 and plan.settings["gkd_steps"].source == "keyword"
    assert plan.value("bld_tokens") == 65536 and plan.settings["bld_tokens"].source == "preset"


FLAG_VALUES = {  # a value for every setting, different from its default, and how to write it as a flag
    "model": None, "data": (["stdlib", "stdlib"], ["--data", "stdlib", "stdlib"]),
    "budget": ("4xH200", ["--budget", "4xH200"]), "cluster": ("2xH100", ["--cluster", "2xH100"]),
    "max_memory_per_rank": ("50GiB", ["--max-memory-per-rank", "50GiB"]), "tp": (3, ["--tp", "3"]), "dtype": ("fp8", ["--dtype", "fp8"]),
    "speedup": (1.7, ["--speedup", "1.7"]), "throughput": (50.0, ["--throughput", "50"]),
    "memory": (30.0, ["--memory", "30"]), "scenario": ("prefill", ["--scenario", "prefill"]),
    "batch": (3, ["--batch", "3"]), "context": (333, ["--context", "333"]), "solver": ("pulp", ["--solver", "pulp"]),
    "constraints": (["layer[0] == parent"], ["--constraint", "layer[0] == parent"]),
    "calibrate": (True, ["--calibrate"]), "baselines": (["shortgpt"], ["--baselines", "shortgpt"]),
    "engine": ("trtllm", ["--engine", "trtllm"]),
    "preset": ("full", ["--preset", "full"]), "bld_tokens": (1234, ["--bld-tokens", "1234"]),
    "bld_eval_sequences": (5, ["--bld-eval-sequences", "5"]), "ffn_refit": (True, ["--ffn-refit"]),
    "space": ({"ffn": {"sizes": [0.5]}, "attention": {"kv_heads": [1]}}, ["--space", "{tmp}/space.yaml"]),
    "score_sequences": (5, ["--score-sequences", "5"]), "score_seq_len": (77, ["--score-seq-len", "77"]),
    "quality_context": (512, ["--quality-context", "512"]),
    "finalists": (3, ["--finalists", "3"]), "refine_rounds": (2, ["--refine-rounds", "2"]), "child_bld_tokens": (4096, ["--child-bld-tokens", "4096"]),
    "child_refit": (True, ["--child-refit"]), "fuse_threshold": (0.05, ["--fuse-threshold", "0.05"]), "fuse_sequences": (6, ["--fuse-sequences", "6"]),
    "fuse_distill_steps": (7, ["--fuse-distill-steps", "7"]), "gkd_steps": (9, ["--gkd-steps", "9"]),
    "gkd_batch": (3, ["--gkd-batch", "3"]), "gkd_top_k": (32, ["--gkd-top-k", "32"]), "eval_sequences": (11, ["--eval-sequences", "11"]),
    "measure_speed": (False, ["--no-speed"]), "seed": (5, ["--seed", "5"]),
}


def _plan_json(capsys, argv: list[str]) -> dict:
    main(["plan", "--json", *argv])
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", [s.name for s in SETTINGS if s.name != "model"])
def test_yaml_then_flag_equals_keyword_override_for_every_setting(name, tmp_path, smol_shape, capsys):
    assert set(FLAG_VALUES) == set(SETTINGS.names()), "every setting needs a flag"
    value, flag = FLAG_VALUES[name]
    if name == "space":  # a file holding the section
        (tmp_path / "space.yaml").write_text(yaml.safe_dump({"space": value}))
        flag = [f.format(tmp=tmp_path) for f in flag]
    base = {"model": smol_shape, "budget": "8xH100", "speedup": 1.3, "gkd_steps": 4, "batch": 2}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    out = ["--out", str(tmp_path / "run")]
    cli = _plan_json(capsys, ["--config", str(path), *flag, *out])
    plan = resolve(SearchConfig.from_file(path).merge({name: value}))
    values = {k: v["value"] for k, v in cli["settings"].items()}
    assert values == json.loads(json.dumps(plan.values()))
    assert cli["target"] == plan.target.to_dict()
    assert cli["settings"][name]["source"] == "flag"
    assert plan.settings[name].source == "keyword"
    expected = list(value) if isinstance(value, (list, tuple)) else value
    assert values[name] == expected


def test_bad_values_are_one_line_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="speedup must be a number, got 'fast'"):
        SearchConfig.from_dict({"speedup": "fast"})
    path = tmp_path / "bad.yaml"
    path.write_text("speedup: fast\n")
    assert main(["plan", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "speedup must be a number" in err and "Traceback" not in err
    for bad in ({"gkd_steps": -1}, {"batch": 0}, {"calibrate": "yes"}, {"preset": "huge"}, {"tp": 1.5},
                {"speedup": float("nan")}, {"bogus": 1}):
        with pytest.raises(ConfigError):
            SearchConfig.from_dict(bad)


def test_plan_json_has_settings_target_and_stages(tmp_path, smol_shape, capsys):
    doc = _plan_json(capsys, ["--model", smol_shape, "--out", str(tmp_path / "run")])
    assert doc["settings"]["speedup"] == {"value": 1.5, "source": "default"}
    assert doc["settings"]["gkd_steps"] == {"value": 16, "source": "preset"}
    assert doc["settings"]["model"]["source"] == "flag"
    assert set(doc["target"]) >= {"accelerator", "count", "tensor_parallel", "replicas", "dtype"}
    assert doc["feasibility"]["feasible"] is True and doc["feasibility"]["max_speedup"] > 1.5
    # only config.json: a plan before downloading (resources per stage), nothing written; search refuses
    assert doc["problem"] is None and doc["parent"]["weights"] is False
    assert [s["stage"] for s in doc["stages"]] == ["library", "bld", "score", "profile", "solve", "child_bld", "fuse", "gkd",
                                                   "export", "evaluate"]
    for s in doc["stages"]:
        assert s["action"] == "run" and s["peak_device_gib"] > 0 and s["predicted_s"] >= 0 and s["rounds"] >= 1
    assert not (tmp_path / "run").exists()
    assert main(["search", "--model", smol_shape, "--out", str(tmp_path / "run")]) == 2
    assert "no weights" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_profile_picks_a_tensor_parallel_degree_the_model_splits_into(smol_shape, tmp_path, capsys):
    out = tmp_path / "costs"
    assert main(["profile", smol_shape, "--target", "1000xH100", "--out", str(out)]) == 0
    deployment = json.loads((out / "profile.json").read_text())["deployment"]
    # not tensor parallelism 1000 for 9 query heads: 1, with the other 999 GPUs serving replicas
    assert (deployment["tensor_parallel"], deployment["replicas"], deployment["count"]) == (1, 1000, 1000)
    capsys.readouterr()
    assert main(["profile", smol_shape, "--target", "8xH100", "--tp", "8", "--out", str(tmp_path / "c2")]) == 2
    assert "valid degrees: 1, 3" in capsys.readouterr().err


def test_the_quality_stages_keep_their_values_on_a_cluster_of_several_ranks(smol_shape):
    names = ("finalists", "child_bld_tokens", "child_refit", "gkd_top_k")
    one = resolve(SearchConfig(model=smol_shape))
    two = resolve(SearchConfig(model=smol_shape, cluster="2xcpu"))
    full = resolve(SearchConfig(model=smol_shape, cluster="2xcpu", preset="full"))
    assert tuple(one.value(n) for n in names) == tuple(two.value(n) for n in names) == (4, 16384, False, 64)
    assert tuple(full.value(n) for n in names) == (8, 131072, True, 64)
    assert {full.settings[n].source for n in names} == {"preset"}
    # nothing switched off; the one note: a GKD batch of one 1024-token sequence rounded up to split over 2 ranks
    for plan in (two, full):
        assert plan.notes == ("gkd_batch 2 (the preset said 1): FSDP2 splits every GKD batch over the 2 ranks",)


def test_refinement_is_refused_on_several_ranks_and_a_preset_change_is_noted(smol_shape, monkeypatch):
    with pytest.raises(ConfigError, match=r"^--refine-rounds 1: refinement .* not sharded, and --cluster 2xcpu has 2 "
                                          r"ranks; set --refine-rounds 0 or search on one rank$"):
        resolve(SearchConfig(model=smol_shape, cluster="2xcpu", refine_rounds=1))
    with pytest.raises(ConfigError, match=r"^--gkd-batch 3 does not split over the 2 ranks .* multiple of 2$"):
        resolve(SearchConfig(model=smol_shape, cluster="2xcpu", gkd_batch=3))
    import dataclasses

    from puzzle.search.settings import SETTINGS

    for name, value in (("refine_rounds", 2), ("gkd_batch", 3)):  # a quick preset that asks for both
        spec = SETTINGS[name]
        monkeypatch.setitem(SETTINGS._specs, name, dataclasses.replace(spec, presets={**spec.presets, "quick": value}))
    plan = resolve(SearchConfig(model=smol_shape, cluster="2xcpu"))
    assert (plan.value("refine_rounds"), plan.value("gkd_batch")) == (0, 4)
    assert [n.split(":")[0] for n in plan.notes] == ["refine_rounds 0 (the preset said 2)",
                                                     "gkd_batch 4 (the preset said 3)"]
    assert plan.to_dict()["notes"] == list(plan.notes)


def test_refinement_is_planned_in_the_solve_stage(smol_shape):
    plain = resolve(SearchConfig(model=smol_shape))
    refined = resolve(SearchConfig(model=smol_shape, refine_rounds=2))
    a, b = ({s.stage: s for s in p.resources.stages}["solve"] for p in (plain, refined))
    assert a.how.endswith("children measured on 2 x 1024 tokens")  # 2 sequences of the quality context
    assert b.how.endswith("refinement round(s) of at most 240 swaps")  # 30 x (6 trained + 2 no-ops)
    ra, rb = a.ranks[0], b.ranks[0]
    H, N = 576, 2 * 1024  # SmolLM2's width; the finalists' tokens
    assert rb.device_bytes - ra.device_bytes == 2 * 30 * N * H * 4 + 4 * N * H * 4
    assert rb.seconds > ra.seconds + 10.0
    with pytest.raises(ConfigError, match="refine_rounds"):
        resolve(SearchConfig(model=smol_shape, refine_rounds=-1))


def test_the_gkd_teacher_cache_is_planned_in_host_ram(smol_shape):
    from puzzle.distill.teacher_cache import bytes_per_token

    def gkd(**kw):  # noqa: ANN003, ANN202
        return next(s for s in resolve(SearchConfig(model=smol_shape, **kw)).resources.stages if s.stage == "gkd")

    cached, live = gkd(), gkd(gkd_top_k=0)
    tokens = 16 * 1 * 1024  # the quick preset's GKD: 16 steps of one sequence of the quality context
    assert cached.ranks[0].host_bytes - cached.ranks[0].device_bytes == tokens * bytes_per_token(64, 576)
    assert "top-64 targets cached" in cached.how and "cached" not in live.how
    # a step reads the cached targets (no parent hidden states, 24 B a logit instead of 32); the parent stays loaded
    # for the validation
    per_token = (4 * 576 * 31 + 32 * 49152) - (4 * 576 + 24 * 49152)
    assert live.ranks[0].device_bytes - cached.ranks[0].device_bytes == pytest.approx(1024 * per_token, rel=1e-12)


def test_the_ffn_refit_reruns_the_library_and_everything_after_it(smol_shape):
    plain, refit = resolve(SearchConfig(model=smol_shape)), resolve(SearchConfig(model=smol_shape, ffn_refit=True))
    up = {"library": "L", "bld": "B"}
    for stage in ("library", "bld"):
        assert _key(plain, stage, up) != _key(refit, stage, up), stage
    assert "ffn_refit" not in _key(plain, "library", up)  # runs from before the setting keep their key
    assert _key(plain, "score", up) == _key(refit, "score", up)  # it reads bld's hash
    with pytest.raises(ConfigError, match="ffn_refit"):
        resolve(SearchConfig(model=smol_shape, ffn_refit="yes"))


def test_the_child_refit_reruns_child_bld_and_the_baselines_only(smol_shape):
    plain, refit = resolve(SearchConfig(model=smol_shape)), resolve(SearchConfig(model=smol_shape, child_refit=True))
    assert (plain.value("child_refit"), refit.value("child_refit")) == (False, True)
    full = resolve(SearchConfig(model=smol_shape, preset="full")).settings["child_refit"]
    assert (full.value, full.source) == (True, "preset")
    up = {s: s.upper() for s in ("library", "bld", "score", "profile", "solve", "child_bld", "fuse", "gkd", "export",
                                 "evaluate")}
    for stage in ("child_bld", "baselines"):
        assert _key(plain, stage, up) != _key(refit, stage, up), stage
        assert "child_refit" not in _key(plain, stage, up)  # runs from before the setting keep their key
    for stage in ("library", "bld", "score", "solve", "gkd"):
        assert _key(plain, stage, up) == _key(refit, stage, up), stage
    with pytest.raises(ConfigError, match="child_refit"):
        resolve(SearchConfig(model=smol_shape, child_refit=1))


def _key(plan, stage, upstream):
    from puzzle.search import REGISTRY

    return REGISTRY[stage].key(plan, {**upstream, "parent": "parent"})

