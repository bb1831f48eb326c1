"""KVCacheManager: prefix hits, salts, the never-all-hit rule, copy-on-write forks, failed allocations."""

from __future__ import annotations

from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams

BLOCK_SIZE = 8


def make_manager(num_blocks: int = 16, enable_prefix_caching: bool = True,
                 cache_salt: str | None = None) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks), BLOCK_SIZE, enable_prefix_caching, cache_salt)


def make_request(request_id: str, prompt: list[int], cache_salt: str | None = None) -> Request:
    return Request(request_id, prompt, SamplingParams(), cache_salt=cache_salt)


def compute_prompt(manager: KVCacheManager, request: Request) -> None:
    """Allocates and 'computes' the whole prompt (prefix hits included), then caches its blocks."""
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - num_hit_tokens, hit_blocks) == []
    request.num_computed_tokens = request.num_tokens
    manager.cache_blocks(request, request.num_computed_tokens)


def pool_state(manager: KVCacheManager):
    pool = manager.block_pool
    return ([(b.ref_cnt, b.block_hash) for b in pool.blocks], list(pool._free_queue))


def test_requests_sharing_a_prefix_hit_its_blocks():
    manager = make_manager()
    shared = list(range(100, 132))  # 4 full blocks
    a = make_request("a", shared + [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute_prompt(manager, a)
    b = make_request("b", shared + [50, 51])
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(b)
    assert hit_blocks == a.block_ids[:4] and num_hit_tokens == 32
    compute_prompt(manager, b)
    assert b.block_ids[:4] == a.block_ids[:4] and b.block_ids[4] not in a.block_ids
    assert all(manager.block_pool.ref_cnt(block_id) == 2 for block_id in a.block_ids[:4])
    assert manager.prefix_cache_queries == a.num_tokens + b.num_tokens
    assert manager.prefix_cache_hits == 32
    manager.block_pool.check_invariants()


def test_hits_survive_free_and_revive_cached_blocks():
    manager = make_manager()
    a = make_request("a", list(range(20)))
    compute_prompt(manager, a)
    cached = list(a.block_ids[:2])
    manager.free(a)
    assert a.block_ids == [] and manager.num_free_blocks == 16
    b = make_request("b", list(range(20)))
    compute_prompt(manager, b)
    assert b.block_ids[:2] == cached and manager.num_free_blocks == 13
    manager.block_pool.check_invariants()


def test_salt_isolates_prefixes():
    manager = make_manager(cache_salt="tenant-a")
    prompt = list(range(40))
    compute_prompt(manager, make_request("a", prompt))
    assert manager.get_computed_blocks(make_request("same-tenant", prompt))[1] == 32
    assert manager.get_computed_blocks(make_request("other", prompt, cache_salt="tenant-b")) == ([], 0)
    unsalted = make_manager()
    compute_prompt(unsalted, make_request("a", prompt))
    assert unsalted.get_computed_blocks(make_request("salted", prompt, cache_salt="x")) == ([], 0)


def test_never_all_tokens_hit():
    manager = make_manager()
    prompt = list(range(32))  # exactly 4 full blocks
    compute_prompt(manager, make_request("a", prompt))
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(make_request("b", prompt))
    assert len(hit_blocks) == 3 and num_hit_tokens == 24  # the last block is recomputed for logits


def test_prefix_caching_disabled_finds_nothing():
    manager = make_manager(enable_prefix_caching=False)
    prompt = list(range(40))
    compute_prompt(manager, make_request("a", prompt))
    assert manager.get_computed_blocks(make_request("b", prompt)) == ([], 0)
    assert manager.block_pool.cached_block_hashes() == [] and manager.prefix_cache_queries == 0


def test_fork_shares_blocks_and_copies_on_write():
    manager = make_manager()
    parent = make_request("p", list(range(20)))  # blocks: full, full, partial (4 tokens)
    compute_prompt(manager, parent)
    parent_blocks = list(parent.block_ids)
    child = make_request("c", list(range(20)))
    manager.fork(parent, child)
    assert child.block_ids == parent_blocks
    assert [manager.block_pool.ref_cnt(b) for b in parent_blocks] == [2, 2, 2]
    child.num_computed_tokens = child.num_prompt_tokens - 1  # recompute the last prompt token
    copies = manager.allocate_slots(child, 1)
    assert copies == [(parent_blocks[2], child.block_ids[2])]
    assert child.block_ids[:2] == parent_blocks[:2] and child.block_ids[2] != parent_blocks[2]
    assert parent.block_ids == parent_blocks  # the parent's table and its last block are intact
    assert [manager.block_pool.ref_cnt(b) for b in parent_blocks] == [2, 2, 1]
    # The parent's partial block is its own again: it decodes in place, no copy.
    assert manager.allocate_slots(parent, 1) == [] and parent.block_ids == parent_blocks
    manager.block_pool.check_invariants()


def test_cached_full_block_is_copied_not_rewritten():
    manager = make_manager()
    parent = make_request("p", list(range(16)))  # exactly 2 full blocks, both cached
    compute_prompt(manager, parent)
    parent_blocks = list(parent.block_ids)
    child = make_request("c", list(range(16)))
    manager.fork(parent, child)
    manager.free(parent)  # the child alone holds the blocks, but block 1 is in the prefix cache
    child.num_computed_tokens = 15
    assert manager.allocate_slots(child, 1) == [(parent_blocks[1], child.block_ids[1])]
    assert manager.block_pool.is_cached(parent_blocks[1]) and manager.block_pool.ref_cnt(parent_blocks[1]) == 0
    assert not manager.block_pool.is_cached(child.block_ids[1])
    manager.block_pool.check_invariants()


def test_decode_token_writes_in_place_or_takes_a_fresh_block_at_a_boundary():
    """The decode step's fast path: a token into the request's own uncached block allocates
    nothing; the token after a full block takes one fresh block (the general path)."""
    manager = make_manager(enable_prefix_caching=False)
    request = make_request("r", list(range(15)))  # one full block and 7 of 8 tokens
    compute_prompt(manager, request)
    blocks, free = list(request.block_ids), manager.block_pool.num_free_blocks
    request.append_output_token(99)
    assert manager.allocate_slots(request, 1) == [] and request.block_ids == blocks
    assert manager.block_pool.num_free_blocks == free
    request.num_computed_tokens += 1  # 16 tokens: both blocks full
    request.append_output_token(98)
    assert manager.allocate_slots(request, 1) == [] and request.block_ids[:2] == blocks
    assert len(request.block_ids) == 3 and manager.block_pool.num_free_blocks == free - 1
    manager.block_pool.check_invariants()


def test_failed_allocation_changes_nothing():
    manager = make_manager(num_blocks=4)
    a = make_request("a", list(range(24)))  # 3 blocks, cached, then freed
    compute_prompt(manager, a)
    manager.free(a)
    before = pool_state(manager)
    # 3 revived hits + 2 fresh blocks > 4 free blocks.
    b = make_request("b", list(range(24)) + [7] * 9)
    hit_blocks, _ = manager.get_computed_blocks(b)
    assert len(hit_blocks) == 3
    assert manager.allocate_slots(b, 9, hit_blocks) is None
    assert pool_state(manager) == before and b.block_ids == [] and manager.prefix_cache_queries == 24
    # 3 revived hits + 1 fresh block fit exactly, and the fresh block evicts none of the hits.
    c = make_request("c", list(range(24)) + [7] * 7)
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(c)
    assert manager.allocate_slots(c, c.num_tokens - num_hit_tokens, hit_blocks) == []
    assert c.block_ids[:3] == hit_blocks and len(set(c.block_ids)) == 4 and manager.num_free_blocks == 0
    manager.block_pool.check_invariants()


def test_failed_copy_on_write_allocation_changes_nothing():
    manager = make_manager(num_blocks=3)
    parent = make_request("p", list(range(20)))
    compute_prompt(manager, parent)  # all 3 blocks in use
    child = make_request("c", list(range(20)))
    manager.fork(parent, child)
    child.num_computed_tokens = 19
    before = pool_state(manager)
    assert manager.allocate_slots(child, 1) is None  # the copy needs a free block
    assert pool_state(manager) == before and child.block_ids == parent.block_ids


def test_free_is_tail_first():
    manager = make_manager(num_blocks=3)
    a = make_request("a", list(range(24)))
    compute_prompt(manager, a)
    a_blocks = list(a.block_ids)
    manager.free(a)
    assert a.block_ids == [] and a.block_hashes  # the table goes, the hash chain stays
    assert manager.block_pool.get_new_blocks(1) == [a_blocks[2]]
    # The tail was evicted; the head still hits.
    b = make_request("b", list(range(24)) + [1])
    assert manager.get_computed_blocks(b)[1] == 16
