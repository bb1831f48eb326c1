"""A fixed pool of KV blocks: reference counts, an LRU queue of free blocks, a prefix cache.

Plain Python, no torch: a block here is only an id (0..num_blocks-1) into the
runner's KV tensors, its reference count, and the hash of its tokens if it is
full and cached.

Every block is in exactly one of two states (``check_invariants`` asserts it)::

    referenced   ref_cnt > 0    held by >= 1 request, not in the free queue
    free         ref_cnt == 0   in the free queue; if it still carries a hash it is
                                "cached and evictable": a prefix lookup can revive it
                                (``touch``) until ``get_new_blocks`` pops it for reuse,
                                which drops its hash.

The free queue is ordered by eviction: ``get_new_blocks`` takes from the front.

    front (evicted first)                                     back (evicted last)
    [ uncached blocks ... | cached blocks, least recently freed ... most recently ]

* A freed block without a hash can never be hit again, so it goes to the front.
* A freed cached block goes to the back. Callers free a request's blocks tail
  first, so its tail blocks are evicted before its head blocks: the head is the
  part most likely shared with the next request (system prompt, chat history).

The prefix cache maps ``block_hash -> block_id`` (hashes from engine.block_hash).
The first block cached under a hash wins; a later block with equal contents stays
uncached. ``block.block_hash`` is set exactly when the map points at that block.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0  # requests holding this block
    block_hash: Optional[int] = None  # set while the block is in the prefix cache


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        # block_id -> None, in eviction order (front first); O(1) remove by id.
        self._free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block_hash -> block_id

    # ---- queries ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks with no reference, cached-and-evictable ones included."""
        return len(self._free_queue)

    @property
    def usage(self) -> float:
        """Share of blocks referenced by requests (0.0 .. 1.0)."""
        return 1.0 - len(self._free_queue) / self.num_blocks

    def ref_cnt(self, block_id: int) -> int:
        return self.blocks[block_id].ref_cnt

    def is_cached(self, block_id: int) -> bool:
        """True while the block is in the prefix cache (its contents must not change)."""
        return self.blocks[block_id].block_hash is not None

    def get_cached_block(self, block_hash: int) -> Optional[int]:
        """The block holding the tokens of ``block_hash``, referenced or not; None on a miss."""
        return self._cached.get(block_hash)

    def cached_block_hashes(self) -> list[int]:
        """Hashes of every block in the prefix cache (referenced or evictable)."""
        return list(self._cached)

    # ---- allocation ---------------------------------------------------------------------------
    def get_new_blocks(self, num_blocks: int) -> list[int]:
        """Pops ``num_blocks`` free blocks (front of the queue first), each with ref_cnt 1.

        A popped block that was cached is evicted: its hash leaves the prefix cache.
        Raises ValueError if fewer than ``num_blocks`` blocks are free.
        """
        if num_blocks > len(self._free_queue):
            raise ValueError(f"asked for {num_blocks} blocks but only {len(self._free_queue)} are free")
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Adds one reference to each block; a free (cached) block leaves the free queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free_queue[block_id]
            block.ref_cnt += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drops one reference from each block, in the order given.

        A block whose count reaches 0 joins the free queue: at the back if cached,
        at the front if not. Pass a request's blocks tail first (see module doc).
        """
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block_id} freed more often than referenced")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue[block_id] = None
                if block.block_hash is None:
                    self._free_queue.move_to_end(block_id, last=False)

    # ---- prefix cache -------------------------------------------------------------------------
    def cache_full_block(self, block_id: int, block_hash: int) -> bool:
        """Puts a full, computed block into the prefix cache under ``block_hash``.

        Returns False (and changes nothing) if the hash is already cached by another
        block (first one wins) or the block already carries a hash.
        """
        block = self.blocks[block_id]
        if block_hash in self._cached or block.block_hash is not None:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block_id
        return True

    # ---- checks -------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Asserts the state invariants of the module docstring (for tests)."""
        for block in self.blocks:
            assert block.ref_cnt >= 0, block
            assert (block.ref_cnt == 0) == (block.block_id in self._free_queue), block
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) == block.block_id, block
        for block_hash, block_id in self._cached.items():
            assert self.blocks[block_id].block_hash == block_hash, (block_hash, block_id)
        assert len(self._free_queue) <= self.num_blocks
