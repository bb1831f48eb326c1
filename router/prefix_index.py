"""Bounded LRU index: which replicas hold which KV blocks (by block hash).

Plain Python (no torch, no ray). Keys are the chained block hashes of
``engine.block_hash``, so a hash names a whole prefix, and a request's longest
cached prefix on a replica is the run of its leading hashes that replica holds::

    holders (LRU order, oldest first)          per replica
    +-----------+----------------+             +------+------------------+
    | hash h7   | {r1}           |  <- evict   | r0   | {h0, h1, h2}     |
    | hash h2   | {r0}           |             | r1   | {h0, h7}         |
    | hash h1   | {r0}           |             +------+------------------+
    | hash h0   | {r0, r1}       |  <- newest
    +-----------+----------------+

Invariant: ``block_hash in self._replica_blocks[r]`` iff ``r in self._holders[block_hash]``.
A chain is touched tail first, so its head (shared by many requests) is the
most recently used and the tail (a single request's suffix) is evicted first.
The capacity counts block hashes, whatever the number of holders.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence


class PrefixIndex:
    def __init__(self, capacity_blocks: int = 1_000_000):
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._holders: OrderedDict[int, set[str]] = OrderedDict()
        self._replica_blocks: dict[str, set[int]] = {}

    def __len__(self) -> int:
        return len(self._holders)

    @property
    def replica_ids(self) -> list[str]:
        return list(self._replica_blocks)

    def num_blocks(self, replica_id: str) -> int:
        """Blocks indexed for ``replica_id`` (0 if unknown)."""
        return len(self._replica_blocks.get(replica_id, ()))

    def blocks_of(self, replica_id: str) -> set[int]:
        """A copy of the blocks indexed for ``replica_id``."""
        return set(self._replica_blocks.get(replica_id, ()))

    def insert(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """Record that ``replica_id`` caches every block of the chain; marks them used."""
        owned = self._replica_blocks.setdefault(replica_id, set())
        holders_of = self._holders
        for block_hash in reversed(block_hashes):
            holders = holders_of.get(block_hash)
            if holders is None:
                holders_of[block_hash] = {replica_id}
            else:
                holders.add(replica_id)
                holders_of.move_to_end(block_hash)
            owned.add(block_hash)
        self._evict()

    def match(self, block_hashes: Sequence[int], touch: bool = True) -> dict[str, int]:
        """Longest cached prefix per replica: ``{replica_id: num leading blocks held}``.

        A replica's run stops at its first missing block; replicas holding no
        leading block are absent. ``touch`` marks matched blocks as used.
        """
        holders_of = self._holders
        matched: dict[str, int] = {}
        alive: set[str] = set()
        num_matched = 0
        for i, block_hash in enumerate(block_hashes):
            holders = holders_of.get(block_hash)
            if holders is None:
                break
            if i == 0:
                alive = set(holders)
            elif not alive <= holders:  # someone's run ends here (rare: cheap subset test first)
                for replica_id in alive - holders:
                    matched[replica_id] = i
                alive &= holders
                if not alive:
                    break
            num_matched = i + 1
        for replica_id in alive:
            matched[replica_id] = num_matched
        if touch and matched:
            longest = max(matched.values())
            for block_hash in reversed(block_hashes[:longest]):
                holders_of.move_to_end(block_hash)
        return matched

    def remove_replica(self, replica_id: str) -> None:
        """Forget a dead or scaled-down replica."""
        for block_hash in self._replica_blocks.pop(replica_id, ()):
            holders = self._holders.get(block_hash)
            if holders is not None:
                holders.discard(replica_id)
                if not holders:
                    del self._holders[block_hash]

    def replace_replica_blocks(self, replica_id: str, block_hashes: Iterable[int]) -> None:
        """Make the index hold exactly ``block_hashes`` for ``replica_id``.

        A correction from the replica's own report of its prefix cache: blocks it evicted
        are dropped, blocks it has that we did not know are added (as most recently used,
        in the given order's reverse); blocks both sides knew keep their place in the LRU.
        A report lists every cached block (tens of thousands on a GPU replica) and is applied
        in the ingress's process: the work is set differences (in C) plus a Python step per
        changed block, not per reported block.
        """
        new_blocks = block_hashes if isinstance(block_hashes, list) else list(block_hashes)
        new_set = set(new_blocks)
        owned = self._replica_blocks.setdefault(replica_id, set())
        for block_hash in owned - new_set:
            holders = self._holders.get(block_hash)
            if holders is not None:
                holders.discard(replica_id)
                if not holders:
                    del self._holders[block_hash]
        owned &= new_set
        added = new_set - owned
        if added:
            self.insert(replica_id, [h for h in new_blocks if h in added])

    def _evict(self) -> None:
        holders_of = self._holders
        while len(holders_of) > self.capacity_blocks:
            block_hash, holders = holders_of.popitem(last=False)
            for replica_id in holders:
                owned = self._replica_blocks.get(replica_id)
                if owned is not None:
                    owned.discard(block_hash)
