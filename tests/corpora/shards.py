"""A corpus too slow for one test (the limit is 60 s), run as several tests over interleaved slices
of it: each shard asserts what holds op by op and prints its pass rate, and keeps its outcomes, so
that a last test asserts the floor over the whole corpus once every shard has run in the session."""
from __future__ import annotations

import pytest


class Shards:
    def __init__(self, count: int):
        self.count = count
        self.ids = [f"shard{i}of{count}" for i in range(count)]
        self._outcomes: dict[int, list] = {}

    def slice(self, items: list, shard: int) -> list:
        """Every ``count``-th item from ``shard`` on: the costly items spread over the shards alike."""
        return items[shard::self.count]

    def record(self, shard: int, outcomes: list) -> None:
        self._outcomes[shard] = outcomes

    def all(self) -> list:
        """Every shard's outcomes, or a skip naming the shards this session did not run (a ``-k``
        selection): the floor is a statement about the whole corpus."""
        missing = [self.ids[i] for i in range(self.count) if i not in self._outcomes]
        if missing:
            pytest.skip(f"the floor is over the whole corpus; not run in this session: {', '.join(missing)}")
        return [o for i in range(self.count) for o in self._outcomes[i]]
