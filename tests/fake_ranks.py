"""Rank r of an N-rank sharded optimizer in one process, for the local parts
of sharding: init, load_full_state, sharded_state_dict, state_nbytes (no
collective runs in them). A step runs collectives: that needs real ranks
(tests/test_distributed.py launches them).

FakeRank is a subclass of mx.distributed.Group, so RMSprop takes it as it
takes a real group; it answers only rank() and size().
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from mlx_fused_rmsprop import RMSprop


class FakeRank(mx.distributed.Group):
    def __init__(self, rank: int, size: int) -> None:  # no base init: nothing to connect
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def sharded_at(rank: int, ranks: int, parameters: Any, full_state: Any = None, **options: Any) -> RMSprop:
    """An optimizer as rank ``rank`` of ``ranks`` has it after init(parameters),
    from ``full_state`` (load_full_state) or fresh."""
    opt = RMSprop(0.1, shard_group=FakeRank(rank, ranks), **options)
    if full_state is not None:
        opt.load_full_state(full_state)
    opt.init(parameters)
    return opt


def rank_state_dicts(full_state: Any, parameters: Any, ranks: int, **options: Any) -> list[dict]:
    """Every rank's sharded_state_dict() of ``full_state`` over ``ranks`` ranks."""
    return [
        sharded_at(r, ranks, parameters, full_state, **options).sharded_state_dict()
        for r in range(ranks)
    ]
