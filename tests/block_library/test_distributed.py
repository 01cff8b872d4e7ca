"""One process-group wrapper: the stages' ``Shard`` is also the search's ``Group``."""

from __future__ import annotations

import torch

from block_library.distributed import Shard


def test_the_search_group_is_a_shard_without_layers(monkeypatch):
    from puzzle.search.ranks import Group, join

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    group = join()  # a group of one: torch.distributed is never touched
    assert Group is Shard and group == Group(rank=0, world=1)
    assert group.first and group.last and (group.rank, group.world) == (0, 1)
    assert len(group.layers) == 0 and group.device == torch.device("cpu")
    assert group.broadcast({"a": 1}) == {"a": 1} and group.gather(3) == [3]
    group.barrier()
    assert not Group(rank=1, world=2).first and Group(rank=1, world=2).last
