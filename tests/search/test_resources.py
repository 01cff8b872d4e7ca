"""The resource plan: closed-form counts, rounds, refusals with the smallest cluster, `puzzle plan --json`."""

from __future__ import annotations

import json

import pytest

from block_library.memory import TRAIN_BYTES_PER_PARAM, layer_sizes
from puzzle.cli.main import main
from puzzle.errors import ConfigError, UnknownTargetError
from puzzle.parents.hf import puzzle_config_from_hf
from puzzle.parents.shapes import canonical_shape, shape_config_json
from puzzle.search import SearchConfig, resolve
from puzzle.search.cluster import parse_cluster, parse_size
from puzzle.search.resources import GIB
from puzzle.summary import totals


def _config(name: str):
    return puzzle_config_from_hf(shape_config_json(name), where=name)


def _resources(name: str, cluster: str, max_memory: str | None = None, **settings):
    """The resource plan of a search of shape ``name`` on ``cluster``."""
    return resolve(SearchConfig(model=name, cluster=cluster, max_memory_per_rank=max_memory, **settings)).resources


@pytest.mark.parametrize("name, params_b, trainable_b", [("llama-3.1-8b", 8.03, 24.3), ("llama-3.1-70b", 70.55, 241.4),
                                                           ("llama-3.1-405b", 405.85, 1428.5)])
def test_closed_form_counts_match_the_published_sizes(name, params_b, trainable_b):
    config = _config(name)
    assert totals(config).params / 1e9 == pytest.approx(params_b, abs=0.01)
    trainable = sum(s.trainable_params for s in layer_sizes(config))
    assert trainable / 1e9 == pytest.approx(trainable_b, abs=0.1)  # the issue's ~24 B / ~240 B / ~1.4 T
    assert canonical_shape(f"meta-llama/{name.title()}-Instruct") == name


def test_sizes_and_clusters_parse_or_fail_in_one_line():
    assert parse_size("6GiB") == 6 * 2**30 and parse_size("80GB") == 80e9 and parse_size("512MiB") == 2**29
    assert parse_size(2) == 2 * 2**30
    for bad in ("six", "-1GiB", "0GB", "6 parsecs"):
        with pytest.raises(ConfigError, match="--max-memory-per-rank"):
            parse_size(bad)
    c = parse_cluster("64xH100")
    assert (c.count, c.device, c.memory_per_rank) == (64, "H100-SXM", pytest.approx(0.9 * 80e9))
    assert parse_cluster("2xcpu", max_memory="6GiB").memory_per_rank == 6 * 2**30
    with pytest.raises(UnknownTargetError, match="unknown accelerator"):
        parse_cluster("8xH1000")
    with pytest.raises(ConfigError, match="max_memory_per_rank"):
        SearchConfig(max_memory_per_rank="lots")


@pytest.mark.slow  # three 70B resource plans
def test_bld_rounds_grow_as_memory_shrinks_and_every_round_fits():
    config = _config("llama-3.1-70b")
    rounds = []
    for mem in ("200GB", "72GB", "40GB"):
        use = _resources("llama-3.1-70b", "8xH100", mem, bld_tokens=65536).stage("bld")
        assert use.fits and use.peak_device_bytes <= parse_size(mem)
        rounds.append(use.rounds)
    assert rounds[0] < rounds[1] < rounds[2]
    # the rounds hold every trainable variant: 16 bytes per parameter over the rounds of the largest rank
    sizes = layer_sizes(config)
    assert rounds[1] >= sum(s.trainable_params for s in sizes) * TRAIN_BYTES_PER_PARAM / 8 / 72e9


@pytest.mark.slow  # 70B and 405B plans, and the search for the smallest cluster
def test_70b_plans_on_one_node_and_405b_names_the_smallest_cluster(capsys):
    assert main(["plan", "--model", "llama-3.1-70b", "--cluster", "8xH100", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s for s in doc["stages"]}
    assert list(stages) == ["library", "bld", "score", "profile", "solve", "child_bld", "fuse", "gkd", "export", "evaluate"]
    for s in stages.values():
        assert {"stage", "peak_device_gib", "peak_host_gib", "predicted_s", "rounds"} <= set(s)
        assert s["peak_device_gib"] * GIB <= 80e9, s["stage"]
        assert s["fits"], s
    assert stages["bld"]["rounds"] > 1 and doc["problem"] is None

    assert main(["plan", "--model", "llama-3.1-405b", "--cluster", "8xH100"]) == 2
    err = capsys.readouterr().err
    assert "does not fit 8xH100-SXM" in err and "the smallest H100-SXM cluster that fits is" in err
    smallest = err.split("fits is ")[1].split()[0].rstrip(".;")
    plan = resolve(SearchConfig(model="llama-3.1-405b", cluster=smallest))
    assert plan.resources.fits
    n = int(smallest.split("x")[0])
    from puzzle.search.resources import CLUSTER_SIZES

    below = max(k for k in CLUSTER_SIZES if k < n)
    assert not resolve(SearchConfig(model="llama-3.1-405b", cluster=f"{below}xH100")).resources.fits


def test_a_search_under_torchrun_must_match_the_planned_cluster():
    from puzzle.search.preflight import check_group
    from puzzle.search.ranks import Group

    plan = resolve(SearchConfig(model="llama-3.2-1b", cluster="2xcpu", max_memory_per_rank="6GiB"))
    check_group(plan, Group(rank=0, world=2))
    with pytest.raises(ConfigError, match="torchrun started 3"):
        check_group(plan, Group(rank=0, world=3))


def test_the_child_refit_is_planned_in_the_child_bld_stage():
    """The child-stream refit holds the child's and the parent's streams of the training tokens and one layer's
    float64 G and C (at the parent's width, one chunk's products in float32; with the channel selection the elimination's arrays too); it runs before the training, so the stage's peak is the larger of the two; it adds time."""
    from puzzle.distill.child_refit import refit_bytes

    plain = 1000 * 8 * 4 + 10 * (16 + 16) * 8 + 10 * 8 * 4 + (256 + 128) * 4 + (256 + 128) * 8  # chunk's products in float32
    assert refit_bytes(1000, 8, 16, 4, 10, drift=False, select=False) == plain
    assert refit_bytes(1000, 8, 16, 4, 10, drift=False) == plain + 3 * (256 + 128) * 8  # G + lam I, its inverse, an update
    assert refit_bytes(1000, 8, 16, 4, 10, drift=True) - refit_bytes(1000, 8, 16, 4, 10, drift=False) == 1000 * 8 * 4
    for name in ("llama-3.2-1b", "llama-3.1-8b"):
        plain = _resources(name, "1xcpu", "2000GiB", child_bld_tokens=65536, child_refit=False).stage("child_bld")
        refit = _resources(name, "1xcpu", "2000GiB", child_bld_tokens=65536, child_refit=True).stage("child_bld")
        assert refit.ranks[0].device_bytes >= plain.ranks[0].device_bytes
        assert refit.ranks[0].seconds > plain.ranks[0].seconds
        assert "child-stream refit" in refit.how and "refit" not in plain.how


def test_the_ffn_refit_adds_its_gram_matrices_to_the_library_stage():
    """bld.ffn_refit holds a float64 (m, m) Gram matrix per layer with a pruned FFN in host memory, and its solve
    three (m, m) work arrays on the device instead of the linear variants' three (H, H). 8B on 8 ranks (4 layers
    a rank) and on one CPU rank, where host and device memory are one."""
    config = _config("llama-3.1-8b")
    m, H = config.intermediate_size, config.hidden_size
    solve = 3 * 8 * (m * m - H * H)
    for cluster, per_rank in ((parse_cluster("8xH100"), 4), (parse_cluster("1xcpu", max_memory="2000GiB"), 32)):
        mem = "2000GiB" if cluster.is_cpu else None
        # transformers loads every variant: the linear ones' (H, H) solves are there to be replaced
        base = _resources("llama-3.1-8b", cluster.name, mem, ffn_refit=False, engine="transformers").stage("library")
        refit = _resources("llama-3.1-8b", cluster.name, mem, ffn_refit=True, engine="transformers").stage("library")
        for a, b in zip(base.ranks, refit.ranks):
            assert a.layers[1] - a.layers[0] == per_rank
            gram = per_rank * m * m * 8
            if cluster.is_cpu:
                assert b.device_bytes - a.device_bytes == pytest.approx(gram + solve)
            else:
                assert b.device_bytes - a.device_bytes == pytest.approx(solve)
                assert b.host_bytes - a.host_bytes == pytest.approx(gram)
            assert b.seconds > a.seconds
        assert refit.fits
    assert resolve(SearchConfig(model="llama-3.1-8b", cluster="8xH100", ffn_refit=True)).resources.fits
