"""Per-request KV block allocation on top of the ``BlockPool``.

Plain Python, no torch. The manager owns ``Request.block_ids`` (the block table:
logical block i holds the KV of tokens ``[i * block_size, (i + 1) * block_size)``)
and ``Request.block_hashes`` (the hash chain of the request's full blocks, from
engine.block_hash with the request's ``cache_salt``, else the manager's salt).

    tokens   | t0 .. t15 | t16 .. t31 | t32 .. t40 _ _ _ _ _ _ |
    block_ids|    b7     |    b2      |    b9 (partial)        |
    hashes   |    h0     |    h1      |    (none: not full)    |

Invariants:

* A block in the prefix cache is never written again: a request about to write
  into a block that is shared (ref_cnt > 1, e.g. after ``fork``) or cached first
  gets a private copy (copy-on-write); the runner copies ``(src, dst)`` before
  the forward.
* ``allocate_slots`` either succeeds completely or changes nothing.
* Blocks are cached only once computed (``cache_blocks`` after the step), so a
  prefix hit never returns KV that is still being written.
"""

from __future__ import annotations

from typing import Optional, Sequence

from engine.block_hash import block_hash_chain
from engine.kv_cache.block_pool import BlockPool
from engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, block_pool: BlockPool, block_size: int, enable_prefix_caching: bool,
                 cache_salt: Optional[str] = None) -> None:
        self.block_pool = block_pool
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.cache_salt = cache_salt
        self.prefix_cache_queries = 0  # tokens looked up (first allocation of a request)
        self.prefix_cache_hits = 0  # of which found in the cache
        # request_id -> leading blocks already offered to the prefix cache
        self._num_cached_blocks: dict[str, int] = {}

    # ---- stats --------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks a block table needs to hold ``num_tokens`` tokens."""
        return cdiv(num_tokens, self.block_size)

    # ---- prefix cache -------------------------------------------------------------------------
    def _update_block_hashes(self, request: Request) -> list[int]:
        """Extends the request's hash chain to all its full blocks of known tokens."""
        if len(request.block_hashes) < request.num_tokens // self.block_size:
            salt = request.cache_salt if request.cache_salt is not None else self.cache_salt
            request.block_hashes = block_hash_chain(request.all_token_ids, self.block_size, salt,
                                                    start=request.block_hashes)
        return request.block_hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of the request's full blocks: (block ids, tokens covered).

        Never covers every token: the last token is always computed so the model
        produces logits, so a full hit drops its last block. Takes no references;
        pass the blocks to ``allocate_slots`` in the same step.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        block_ids: list[int] = []
        for block_hash in self._update_block_hashes(request)[:max_hit_blocks]:
            block_id = self.block_pool.get_cached_block(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Offers the request's full blocks among its first ``num_computed_tokens`` to the cache."""
        if not self.enable_prefix_caching:
            return
        if num_computed_tokens // self.block_size <= self._num_cached_blocks.get(request.request_id, 0):
            return  # no block filled up since the last call (the common decode step)
        hashes = self._update_block_hashes(request)
        num_full = min(num_computed_tokens // self.block_size, len(hashes), len(request.block_ids))
        start = self._num_cached_blocks.get(request.request_id, 0)
        for i in range(start, num_full):
            self.block_pool.cache_full_block(request.block_ids[i], hashes[i])
        self._num_cached_blocks[request.request_id] = max(start, num_full)

    # ---- allocation ---------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[int] = ()) -> Optional[list[tuple[int, int]]]:
        """Makes room for ``num_new_tokens`` tokens after the computed ones.

        ``new_computed_blocks`` are prefix-cache hits from ``get_computed_blocks``
        (only on a request's first allocation); they count as computed. Returns the
        copy-on-write copies ``(src, dst)`` the runner must make before writing, or
        None, allocating nothing, if the pool has too few free blocks.
        """
        pool = self.block_pool
        if num_new_tokens == 1 and not new_computed_blocks:
            # A decode step's usual case, taken first (every running request, every step): the
            # token goes into a block the request holds alone and that is not cached, so there
            # is nothing to allocate or copy (what the general path below also finds).
            index = request.num_computed_tokens // self.block_size
            if index < len(request.block_ids):
                block = pool.blocks[request.block_ids[index]]
                if block.ref_cnt == 1 and block.block_hash is None:
                    return []
        if new_computed_blocks and request.block_ids:
            raise ValueError(f"request {request.request_id}: prefix hits only on the first allocation")
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_total = num_computed + num_new_tokens
        table_len = len(request.block_ids) + len(new_computed_blocks)
        num_fresh = max(0, self.num_blocks_for(num_total) - table_len)
        # Existing blocks that this step writes into and that are shared or cached.
        first_written = num_computed // self.block_size
        last_written = min(self.num_blocks_for(num_total), len(request.block_ids))
        cow_indices = [i for i in range(first_written, last_written if num_new_tokens > 0 else 0)
                       if pool.ref_cnt(request.block_ids[i]) > 1 or pool.is_cached(request.block_ids[i])]
        # Count before touching anything: reviving a free cached hit also uses a free block.
        num_revived = sum(1 for b in new_computed_blocks if pool.ref_cnt(b) == 0)
        if num_fresh + len(cow_indices) + num_revived > pool.num_free_blocks:
            return None

        first_allocation = not request.block_ids and request.num_computed_tokens == 0
        pool.touch(new_computed_blocks)
        request.block_ids.extend(new_computed_blocks)
        copies = []
        for i in cow_indices:
            src = request.block_ids[i]
            (dst,) = pool.get_new_blocks(1)
            request.block_ids[i] = dst
            pool.free_blocks([src])
            copies.append((src, dst))
        request.block_ids.extend(pool.get_new_blocks(num_fresh))
        if first_allocation and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(new_computed_blocks) * self.block_size
        return copies

    def fork(self, parent: Request, child: Request) -> None:
        """Gives ``child`` the parent's prompt blocks by reference (n > 1 sampling).

        The parent's prompt must be computed. The child's first write into a
        shared block will copy it (see ``allocate_slots``); the scheduler sets the
        child's computed-token count.
        """
        if child.block_ids:
            raise ValueError(f"request {child.request_id} already holds blocks; cannot fork into it")
        if parent.num_computed_tokens < parent.num_prompt_tokens:
            raise ValueError(f"request {parent.request_id} has not computed its prompt; cannot fork")
        shared = parent.block_ids[:self.num_blocks_for(parent.num_prompt_tokens)]
        self.block_pool.touch(shared)
        child.block_ids = list(shared)

    def free(self, request: Request) -> None:
        """Drops the request's references, tail first, and clears its block table.

        The hash chain stays: it depends only on the tokens, and a resumed
        request reuses it.
        """
        self.block_pool.free_blocks(reversed(request.block_ids))
        request.block_ids = []
        self._num_cached_blocks.pop(request.request_id, None)
