"""The gkd stage's plan under torchrun with the parent's cached targets: every rank holds the whole cache (of the
training and the validation sequences), the last rank writes it (twice the cache before training) and keeps the file
on disk, and no rank loads the parent in training: its shard, its hidden states and its logits leave every rank."""

from __future__ import annotations

import pytest

from block_library.memory import PROCESS_BYTES
from puzzle.distill.teacher_cache import bytes_per_token
from puzzle.search import SearchConfig, resolve
from puzzle.search.resources import GIB
from puzzle.summary import totals


def _gkd(cluster: str, memory: str | None, **settings):
    plan = resolve(SearchConfig(model="smollm2-135m", cluster=cluster, max_memory_per_rank=memory, **settings))
    s = {k: plan.value(k) for k in ("gkd_steps", "gkd_batch", "gkd_top_k", "eval_sequences",
                                          "quality_context")}
    return plan.resources.stage("gkd"), s, plan.parent_config


def _cache(s, config, k: int) -> tuple[float, float]:
    tokens = (s["gkd_steps"] * s["gkd_batch"] + min(8, s["eval_sequences"])) * s["quality_context"]  # training, validation
    file = tokens * bytes_per_token(k, config.hidden_size)
    return file + tokens * 4 * k, file  # in memory the token ids are int64


def _teacher(s, config, world: int, dtype_bytes: int) -> float:
    """What a rank no longer holds without the live parent: its shard, and per token its hidden states (all of
    them) and its share of the logits' buffers, less the cached last hidden state (fp32 once read)."""
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    per_token = dtype_bytes * H * (L + 1) + 32 * V - (4 * H + 24 * V)
    return dtype_bytes * totals(config).params / world + s["gkd_batch"] // world * s["quality_context"] * per_token


def test_two_cpu_ranks_hold_the_cache_in_their_one_memory():
    live, _, _ = _gkd("2xcpu", "8GiB", gkd_top_k=0)
    cached, s, config = _gkd("2xcpu", "8GiB", gkd_top_k=64)
    held, file = _cache(s, config, 64)
    assert s["gkd_top_k"] == 64 and held > 0
    assert (f"the parent's top-64 targets of the training and validation sequences computed layer-sharded once "
            f"({file / GIB:.2f} GiB), read by every rank: no rank loads the parent in training") in cached.how
    assert "student and teacher sharded" in live.how and "FSDP2 over 2 ranks: the student sharded," in cached.how
    first, last = cached.ranks
    drop = _teacher(s, config, 2, 4)
    # SmolLM2's 135 M fp32 parameters over 2 ranks (0.25 GiB), its hidden states and logits' share of a sequence of
    # the quality context's 1024 tokens
    assert drop / GIB == pytest.approx(0.691, abs=0.001)
    assert first.device_bytes == pytest.approx(live.ranks[0].device_bytes - drop + held)
    assert first.host_bytes == first.device_bytes  # the CPU: one memory
    assert last.device_bytes == pytest.approx(max(live.ranks[1].device_bytes - drop + held,
                                                  PROCESS_BYTES + 3 * held - file))
    assert (first.disk_bytes, last.disk_bytes) == (live.ranks[0].disk_bytes, pytest.approx(file))  # child; cache


def test_gpu_ranks_hold_the_cache_in_host_ram_and_no_parent_on_the_device():
    live, _, _ = _gkd("4xH100", None, gkd_top_k=0)
    cached, s, config = _gkd("4xH100", None, gkd_top_k=64)
    held, file = _cache(s, config, 64)
    drop = _teacher(s, config, 4, 2)  # the parent in bf16
    for before, now in zip(live.ranks, cached.ranks):
        assert now.device_bytes == pytest.approx(before.device_bytes - drop)
        assert now.host_bytes == pytest.approx(before.host_bytes + held if now.rank < 3 else
                                               max(before.host_bytes + held, PROCESS_BYTES + 3 * held - file))
    assert cached.ranks[-1].disk_bytes == pytest.approx(file)
    # a vocabulary smaller than k: every token, the cache of k = V (what the stage computes)
    huge, s, config = _gkd("4xH100", None, gkd_top_k=10**6)
    assert f"top-{config.vocab_size} targets" in huge.how
    assert huge.ranks[0].host_bytes == pytest.approx(live.ranks[0].host_bytes + _cache(s, config, config.vocab_size)[0])
