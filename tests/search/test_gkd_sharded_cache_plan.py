"""The gkd stage's plan under torchrun with the parent's cached targets: every rank holds the whole cache, the last
rank writes it (twice the cache before training) and keeps the file on disk; the FLOPs stay those of the live run
(the parent's forward once, in the layer-sharded pass, instead of in every step)."""

from __future__ import annotations

import pytest

from block_library.memory import PROCESS_BYTES
from puzzle.distill.teacher_cache import bytes_per_token
from puzzle.search import SearchConfig, resolve
from puzzle.search.resources import GIB, SEQ_LEN


def _gkd(cluster: str, memory: str | None, **settings):
    plan = resolve(SearchConfig(model="smollm2-135m", cluster=cluster, max_memory_per_rank=memory, **settings))
    s = {k: plan.value(k) for k in ("gkd_steps", "gkd_batch", "gkd_top_k")}
    return plan.resources.stage("gkd"), s, plan.parent_config


def _cache(s, config, k: int) -> tuple[float, float]:
    tokens = s["gkd_steps"] * s["gkd_batch"] * SEQ_LEN
    file = tokens * bytes_per_token(k, config.hidden_size)
    return file + tokens * 4 * k, file  # in memory the token ids are int64


def test_two_cpu_ranks_hold_the_cache_in_their_one_memory():
    live, _, _ = _gkd("2xcpu", "8GiB", gkd_top_k=0)
    cached, s, config = _gkd("2xcpu", "8GiB", gkd_top_k=64)
    held, file = _cache(s, config, 64)
    assert s["gkd_top_k"] == 64 and held > 0
    assert f"the parent's top-64 targets computed layer-sharded once ({file / GIB:.2f} GiB), read by every rank" \
        in cached.how
    first, last = cached.ranks
    assert first.device_bytes == pytest.approx(live.ranks[0].device_bytes + held)
    assert first.host_bytes == first.device_bytes  # the CPU: one memory
    assert last.device_bytes == pytest.approx(max(live.ranks[1].device_bytes + held, PROCESS_BYTES + 3 * held - file))
    assert (first.disk_bytes, last.disk_bytes) == (live.ranks[0].disk_bytes, pytest.approx(file))  # child; cache
    assert cached.seconds == pytest.approx(live.seconds)  # the parent's forward moved, not removed


def test_gpu_ranks_hold_the_cache_in_host_ram_beside_an_unchanged_device():
    live, _, _ = _gkd("4xH100", None, gkd_top_k=0)
    cached, s, config = _gkd("4xH100", None, gkd_top_k=64)
    held, file = _cache(s, config, 64)
    for before, now in zip(live.ranks, cached.ranks):
        assert now.device_bytes == before.device_bytes
        assert now.host_bytes == pytest.approx(before.host_bytes + held if now.rank < 3 else
                                               max(before.host_bytes + held, PROCESS_BYTES + 3 * held - file))
    assert cached.ranks[-1].disk_bytes == pytest.approx(file)
    # a vocabulary smaller than k: every token, the cache of k = V (what the stage computes)
    huge, s, config = _gkd("4xH100", None, gkd_top_k=10**6)
    assert f"top-{config.vocab_size} targets" in huge.how
    assert huge.ranks[0].host_bytes == pytest.approx(live.ranks[0].host_bytes + _cache(s, config, config.vocab_size)[0])
