"""The finalists measured layer-sharded (:mod:`puzzle.search.finalists_sharded`) against the parent's cached top-k:
the exact KL of one process when k is the vocabulary, a lower KL that ranks the finalists alike when it is not, the
same figures on one rank and on two, and the solve stage on every rank of a torchrun group."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from puzzle.errors import ConfigError
from puzzle.search import SearchConfig, resolve
from tests.search.test_search_e2e import TINY

ROOT = Path(__file__).resolve().parents[2]
SEARCH = {**TINY, "finalists": 1}  # the search only makes the library, BLD, scores and costs; solve is tested here
METRICS = ("kl", "top1_agreement", "nll", "ppl", "parent_nll", "parent_ppl", "loss_delta")


def _ctx(plan, run, *, group=None):  # noqa: ANN001, ANN202
    from puzzle.search.context import StageContext

    ctx = StageContext(plan, run.directory, False, group=group)
    ctx.results.update({n: run.stages[n] for n in ("score", "profile", "bld")})
    return ctx


@pytest.fixture(scope="module")
def tiny_run(tiny_text_parent, tmp_path_factory):
    from puzzle.search import search

    return search(SearchConfig(model=str(tiny_text_parent), **SEARCH), tmp_path_factory.mktemp("fs") / "run",
                  progress=False)


@pytest.fixture(scope="module")
def one_rank(tiny_run, tiny_text_parent, tmp_path_factory):
    """In one process: the MIP's 4 best different children, measured whole (exact) and layer-sharded on one rank
    with k = 1024 on the 4 held-out sequences, and with k = V on 2 x 64 of their tokens."""
    from block_library import open_library
    from block_library.distributed import Shard
    from block_library.session import parent_fingerprint
    from puzzle.search.finalists import finalist_ids, measure_finalists
    from puzzle.search.finalists_sharded import measure_finalists_sharded
    from puzzle.search.stages.solve import solve_problem
    from solvers.diverse import diverse_solutions

    plan = resolve(SearchConfig(model=str(tiny_text_parent), **SEARCH))
    ctx, d = _ctx(plan, tiny_run), tmp_path_factory.mktemp("one_rank")
    sols = diverse_solutions(solve_problem(ctx), 4, min_fraction=0.1)
    lib, sha, V = open_library(ctx.out("bld", "library")), parent_fingerprint(ctx.source), plan.parent_config.vocab_size
    ids = finalist_ids(["stdlib"], ctx.tokenizer, skip=16, sequences=4)
    small = ids[:2, :64]

    def sharded(x, k):  # noqa: ANN001, ANN202
        return measure_finalists_sharded(lib, ctx.source, sols, x, shard=Shard(rank=0, world=1), top_k=k,
                                         path=d / f"top{k}.safetensors", parent_sha256=sha)

    return {"exact": measure_finalists(lib, ctx.parent, sols, ids), "top": sharded(ids, 1024),
            "exact_small": measure_finalists(lib, ctx.parent, sols, small), "all_small": sharded(small, V), "V": V}


@pytest.fixture(scope="module")
def two_ranks(tiny_run, tiny_text_parent, tmp_path_factory):
    """The worker on 2 ranks: rank r's ``rank{r}.json`` and the solve directory rank 0 wrote."""
    d = tmp_path_factory.mktemp("two_ranks")
    (d / "results.pkl").write_bytes(pickle.dumps({n: tiny_run.stages[n] for n in ("score", "profile", "bld")}))
    config = {"model": str(tiny_text_parent), **SEARCH, "finalists": 4, "cluster": "2xcpu", "gkd_batch": 2}
    (d / "args.json").write_text(json.dumps({"config": config, "run": str(tiny_run.directory),
                                             "results": str(d / "results.pkl"), "out": str(d / "out")}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.search.finalists_sharded_worker", str(d / "args.json")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    assert r.returncode == 0, "\n".join(line for line in r.stderr.splitlines() if line.startswith("[rank"))[-4000:]
    return [json.loads((d / "out" / f"rank{k}.json").read_text()) for k in (0, 1)], d / "out" / "solve"


def _labels(f) -> str:  # noqa: ANN001
    return " ".join(f.solution.layer_labels())


@pytest.mark.slow  # a tiny search (about 15 s), then the finalists measured three ways
def test_targets_over_the_whole_vocabulary_measure_the_exact_kl(one_rank):
    exact, sharded = one_rank["exact_small"], one_rank["all_small"]
    assert [f.mip_rank for f in sharded] == [f.mip_rank for f in exact] and len(exact) == 4
    for e, s in zip(exact, sharded):
        assert s.quality["top_k"] == one_rank["V"] and s.quality["label_in_top_k"] == 1.0
        for m in METRICS:
            assert s.quality[m] == pytest.approx(e.quality[m], rel=1e-5, abs=1e-7), m
    assert exact[0].kl > 0.05 and exact[-1].kl > exact[0].kl * 1.1  # children that differ


@pytest.mark.slow
def test_top_k_targets_measure_a_lower_kl_that_ranks_the_finalists_alike(one_rank):
    exact, top = one_rank["exact"], one_rank["top"]
    assert [f.mip_rank for f in top] == [f.mip_rank for f in exact]  # the same ranking, hence the same child
    for e, t in zip(exact, top):
        assert 0 < t.kl < e.kl  # coarsened: the random parent puts 89% of its mass outside its top 1024 tokens
        for m in ("top1_agreement", "nll", "ppl"):  # the child's own figures and the parent's top-1 are exact
            assert t.quality[m] == pytest.approx(e.quality[m], rel=1e-5), m
        assert t.quality["top_k"] == 1024 and 0 < t.quality["label_in_top_k"] < 1
        assert "parent_nll" not in t.quality and "loss_delta" not in t.quality  # not estimated


@pytest.mark.slow  # two ranks (about 30 s on 2 cores)
def test_two_ranks_measure_what_one_rank_measures(two_ranks, one_rank):
    (rank0, rank1), _ = two_ranks
    assert rank0["direct"] == rank1["direct"]  # the same finalists on every rank
    assert rank0["error"] == rank1["error"] == "the validation split has no sequences"  # rank 0's, raised on both
    one = {_labels(f): f.quality for f in one_rank["all_small"]}
    assert [r["blocks"] for r in rank0["direct"]] == [_labels(f) for f in one_rank["all_small"]]
    for r in rank0["direct"]:
        for m in METRICS:
            assert r[m] == pytest.approx(one[r["blocks"]][m], rel=1e-5, abs=1e-7), m


@pytest.mark.slow
def test_the_solve_stage_measures_on_every_rank_and_rank_0_writes(two_ranks, one_rank):
    from puzzle.schema import load_blocks

    (rank0, rank1), solve_dir = two_ranks
    assert rank1["stage"] == {}  # the pipeline records rank 0's outputs
    out = rank0["stage"]
    table = pd.read_csv(solve_dir / "finalists.csv")
    top = one_rank["top"]  # the same k (1024 < V) on one rank
    assert list(table.blocks) == [_labels(f) for f in top] and list(table.mip_rank) == [f.mip_rank for f in top]
    assert list(table.kl) == pytest.approx([f.kl for f in top], rel=1e-5)
    assert out["finalists"] == 4 and out["finalist_top_k"] == 1024 and out["mip_rank"] == top[0].mip_rank
    assert out["kl"] == pytest.approx(top[0].kl, rel=1e-5)
    blocks = load_blocks(solve_dir / "blocks.json")
    assert " ".join(f"{b.attention.label}|{b.ffn.label}" for b in blocks) == table.blocks[0]
    assert (solve_dir / "parent-top1024.safetensors").is_file() and (solve_dir / "solution.json").is_file()


def test_the_key_holds_k_only_where_the_kl_is_coarsened():
    from puzzle.search import REGISTRY

    solve = next(s for s in REGISTRY.all() if s.name == "solve")
    upstream = {"parent": "p", **{n: f"sha-{n}" for n in REGISTRY.names()}}

    def key(**kw):  # noqa: ANN003, ANN202
        return solve.key(resolve(SearchConfig.from_dict({"budget": "cpu", **kw})), upstream)

    one, two = key(), key(cluster="2xcpu", max_memory_per_rank="6GiB")
    assert "finalist_top_k" not in one and two.pop("finalist_top_k") == 1024  # SmolLM2: V = 49,152
    assert two == one  # nothing else differs
    assert "finalist_top_k" not in key(cluster="2xcpu", max_memory_per_rank="6GiB", finalists=1)
    assert key(cluster="4xcpu", max_memory_per_rank="3GiB")["finalist_top_k"] == 1024  # 2 or 4 ranks: one key


def test_the_plan_shards_the_finalists_over_the_ranks():
    from puzzle.distill.teacher_cache import bytes_per_token
    from puzzle.search.resources import GIB

    plan = resolve(SearchConfig.from_dict({"budget": "cpu", "cluster": "2xcpu", "max_memory_per_rank": "6GiB"}))
    use = plan.resources.stage("solve")
    assert use.how == ("layer-sharded over 2 ranks: the parent's top-1024 log-probs cached once, each of the 4 "
                       "finalists measured against them on 2 x 1024 tokens")
    r0, r1 = use.ranks
    assert r0.layers == (0, 15) and r1.layers == (15, 30)  # SmolLM2's 30 equal layers
    assert r0.disk_bytes == 0 and r1.disk_bytes == 2 * 1024 * bytes_per_token(1024, 576)
    # the last rank: the LM head and a chunk's (2, 1023, 49152) log-probs three times over, 1.0 GiB more
    assert 0.9 * GIB < r1.device_bytes - r0.device_bytes < 1.2 * GIB
    one = resolve(SearchConfig.from_dict({"budget": "cpu"})).resources.stage("solve")
    assert one.how.startswith("one process") and max(r0.device_bytes, r1.device_bytes) < one.peak_device_bytes


def test_refinement_is_refused_on_several_ranks(tiny_text_parent):
    from puzzle.search.context import StageContext
    from puzzle.search.stages.solve import STAGE

    plan = resolve(SearchConfig(model=str(tiny_text_parent), **{**SEARCH, "refine_rounds": 1}))
    ctx = StageContext(plan, Path("."), False, group=SimpleNamespace(rank=0, world=2, first=True))
    with pytest.raises(ConfigError, match="refinement"):
        STAGE.run(ctx, Path("."))
