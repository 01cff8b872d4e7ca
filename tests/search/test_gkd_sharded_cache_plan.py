"""The gkd stage's plan under torchrun with the parent's cached targets: every rank holds the rows of its share of
the cache (its part of every step's batch, of the validation sequences), the last rank writes the files a chunk at a
time and keeps them on disk, and no rank loads the parent in training: its shard, its hidden states and its logits
leave every rank. A 405B parent's full-preset cache on 64 H100s (406.55 GiB) is 6.43 GiB a rank."""

from __future__ import annotations

import pytest

from puzzle.distill.teacher_cache import bytes_per_token
from puzzle.search import SearchConfig, resolve
from puzzle.search.resources import GIB
from puzzle.summary import totals


def _gkd(cluster: str, memory: str | None, model: str = "smollm2-135m", **settings):
    plan = resolve(SearchConfig(model=model, cluster=cluster, max_memory_per_rank=memory, **settings))
    s = {k: plan.value(k) for k in ("gkd_steps", "gkd_batch", "gkd_top_k", "eval_sequences",
                                          "quality_context")}
    return plan.resources.stage("gkd"), s, plan.parent_config


def _cache(s, config, k: int, world: int) -> tuple[float, float]:
    """(held by a rank, the files): a rank reads its batch / world sequences of every step and its share of the
    validation's (rounded up); in memory the token ids are int64."""
    T, val = s["quality_context"], min(8, s["eval_sequences"])
    mine = s["gkd_steps"] * (s["gkd_batch"] // world) + -(-val // world)
    file = (s["gkd_steps"] * s["gkd_batch"] + val) * T * bytes_per_token(k, config.hidden_size)
    return mine * T * (bytes_per_token(k, config.hidden_size) + 4 * k), file


def _teacher(s, config, world: int, dtype_bytes: int) -> float:
    """What a rank no longer holds without the live parent: its shard, and per token its hidden states (all of
    them) and its share of the logits' buffers, less the cached last hidden state (fp32 once read)."""
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    per_token = dtype_bytes * H * (L + 1) + 32 * V - (4 * H + 24 * V)
    return dtype_bytes * totals(config).params / world + s["gkd_batch"] // world * s["quality_context"] * per_token


def test_two_cpu_ranks_hold_the_cache_in_their_one_memory():
    live, _, _ = _gkd("2xcpu", "8GiB", gkd_top_k=0)
    cached, s, config = _gkd("2xcpu", "8GiB", gkd_top_k=64)
    held, file = _cache(s, config, 64, 2)
    assert s["gkd_top_k"] == 64 and 0.5 * file < held < 0.6 * file  # half the sequences, ids widened
    assert (f"the parent's top-64 targets of the training and validation sequences computed layer-sharded once "
            f"({file / GIB:.2f} GiB), each rank reading its share ({held / GIB:.2f} GiB): no rank loads the parent "
            "in training") in cached.how
    assert "student and teacher sharded" in live.how and "FSDP2 over 2 ranks: the student sharded," in cached.how
    first, last = cached.ranks
    drop = _teacher(s, config, 2, 4)
    # SmolLM2's 135 M fp32 parameters over 2 ranks (0.25 GiB), its hidden states and logits' share of a sequence of
    # the quality context's 1024 tokens
    assert drop / GIB == pytest.approx(0.691, abs=0.001)
    assert first.device_bytes == pytest.approx(live.ranks[0].device_bytes - drop + held)
    assert first.host_bytes == first.device_bytes  # the CPU: one memory
    assert last.device_bytes == pytest.approx(live.ranks[1].device_bytes - drop + held)  # written a chunk at a time
    assert (first.disk_bytes, last.disk_bytes) == (live.ranks[0].disk_bytes, pytest.approx(file))  # child; cache


def test_gpu_ranks_hold_the_cache_in_host_ram_and_no_parent_on_the_device():
    live, _, _ = _gkd("4xH100", None, gkd_top_k=0)
    cached, s, config = _gkd("4xH100", None, gkd_top_k=64)
    held, file = _cache(s, config, 64, 4)
    drop = _teacher(s, config, 4, 2)  # the parent in bf16
    for before, now in zip(live.ranks, cached.ranks):
        assert now.device_bytes == pytest.approx(before.device_bytes - drop)
        assert now.host_bytes == pytest.approx(before.host_bytes + held)
    assert cached.ranks[-1].disk_bytes == pytest.approx(file)
    # a vocabulary smaller than k: every token, the cache of k = V (what the stage computes)
    huge, s, config = _gkd("4xH100", None, gkd_top_k=10**6)
    assert f"top-{config.vocab_size} targets" in huge.how
    assert huge.ranks[0].host_bytes == pytest.approx(live.ranks[0].host_bytes + _cache(s, config, config.vocab_size, 4)[0])


def test_405b_full_preset_gkd_fits_64_h100s():
    """Each rank reads 1/64 of the 406 GiB cache: the full preset's GKD fits 64 H100s again."""
    gkd, s, config = _gkd("64xH100", None, preset="full", model="llama-3.1-405b")
    held, file = _cache(s, config, 64, 64)
    assert file / GIB == pytest.approx(406.55, abs=0.01) and held / GIB == pytest.approx(6.43, abs=0.01)
    assert f"({file / GIB:.2f} GiB), each rank reading its share ({held / GIB:.2f} GiB)" in gkd.how
    assert gkd.fits and max(r.host_bytes for r in gkd.ranks) <= gkd.host_limit_bytes
