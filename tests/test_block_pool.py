"""BlockPool: reference counts, LRU eviction order of free blocks, prefix cache, usage."""

from __future__ import annotations

import pytest

from engine.kv_cache.block_pool import BlockPool


def test_new_blocks_are_referenced_and_freed_blocks_return():
    pool = BlockPool(4)
    block_ids = pool.get_new_blocks(3)
    assert len(set(block_ids)) == 3
    assert [pool.ref_cnt(b) for b in block_ids] == [1, 1, 1]
    assert pool.num_free_blocks == 1 and pool.usage == 0.75
    pool.touch(block_ids[:1])
    assert pool.ref_cnt(block_ids[0]) == 2
    pool.free_blocks(block_ids)
    assert pool.ref_cnt(block_ids[0]) == 1 and pool.num_free_blocks == 3 and pool.usage == 0.25
    pool.free_blocks(block_ids[:1])
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    pool.check_invariants()


def test_over_allocation_and_double_free_raise():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="only 2 are free"):
        pool.get_new_blocks(3)
    assert pool.num_free_blocks == 2  # nothing taken
    (block_id,) = pool.get_new_blocks(1)
    pool.free_blocks([block_id])
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([block_id])
    pool.check_invariants()


def _cached_request_blocks(pool: BlockPool, hashes: list[int]) -> list[int]:
    block_ids = pool.get_new_blocks(len(hashes))
    for block_id, block_hash in zip(block_ids, hashes):
        assert pool.cache_full_block(block_id, block_hash)
    return block_ids


def test_cached_blocks_stay_findable_after_free_until_reused():
    pool = BlockPool(4)
    block_ids = _cached_request_blocks(pool, [10, 11])
    pool.free_blocks(reversed(block_ids))
    assert pool.num_free_blocks == 4
    assert pool.get_cached_block(10) == block_ids[0] and pool.get_cached_block(11) == block_ids[1]
    # A hit revives the block: referenced again, out of the free queue.
    pool.touch([block_ids[0]])
    assert pool.ref_cnt(block_ids[0]) == 1 and pool.num_free_blocks == 3
    assert sorted(pool.cached_block_hashes()) == [10, 11]
    pool.check_invariants()


def test_eviction_is_lru_and_tail_before_head():
    pool = BlockPool(6)
    a = _cached_request_blocks(pool, [1, 2, 3])
    b = _cached_request_blocks(pool, [4, 5, 6])
    pool.free_blocks(reversed(a))  # a freed first: least recently used
    pool.free_blocks(reversed(b))
    order = [pool.get_new_blocks(1)[0] for _ in range(6)]
    assert order == [a[2], a[1], a[0], b[2], b[1], b[0]]
    assert pool.cached_block_hashes() == []  # every reuse evicted its hash
    pool.check_invariants()


def test_eviction_drops_only_the_reused_blocks_hash():
    pool = BlockPool(3)
    head, tail = _cached_request_blocks(pool, [7, 8])
    pool.free_blocks([tail, head])
    (never_used,) = set(range(3)) - {head, tail}
    assert pool.get_new_blocks(1) == [never_used]  # uncached free blocks go first
    assert pool.get_new_blocks(1) == [tail]
    assert pool.get_cached_block(8) is None and pool.get_cached_block(7) == head
    pool.check_invariants()


def test_uncached_free_blocks_are_reused_before_cached_ones():
    pool = BlockPool(4)
    cached = _cached_request_blocks(pool, [1, 2])
    plain = pool.get_new_blocks(2)
    pool.free_blocks(reversed(cached))
    pool.free_blocks(plain)  # freed later, but worthless: reused first
    assert set(pool.get_new_blocks(2)) == set(plain)
    assert pool.get_cached_block(1) == cached[0] and pool.get_cached_block(2) == cached[1]
    pool.check_invariants()


def test_first_cached_block_wins():
    pool = BlockPool(3)
    first, second = pool.get_new_blocks(2)
    assert pool.cache_full_block(first, 99)
    assert not pool.cache_full_block(second, 99)
    assert not pool.cache_full_block(first, 100)  # a block is cached under one hash only
    assert pool.get_cached_block(99) == first and pool.get_cached_block(100) is None
    assert pool.is_cached(first) and not pool.is_cached(second)
    pool.check_invariants()


def test_usage_counts_referenced_blocks_only():
    pool = BlockPool(8)
    block_ids = _cached_request_blocks(pool, [1, 2, 3, 4])
    assert pool.usage == 0.5
    pool.free_blocks(block_ids)
    assert pool.usage == 0.0 and len(pool.cached_block_hashes()) == 4  # cached but evictable
    pool.check_invariants()
