"""Prefix index: longest-prefix semantics, LRU bound, replica removal and correction."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_hash import block_hash_chain
from router.prefix_index import PrefixIndex


def test_longest_prefix_stops_at_first_missing_block():
    index = PrefixIndex()
    index.insert("r0", [1, 2, 3, 4])
    index.insert("r1", [1, 2])
    index.insert("r1", [9])  # not contiguous with the request chain
    assert index.match([1, 2, 3, 4, 5]) == {"r0": 4, "r1": 2}
    assert index.match([1, 9]) == {"r0": 1, "r1": 2}
    assert index.match([7, 1]) == {}  # first block unknown: no match (hashes are chained)
    assert index.match([]) == {}


def test_holes_cut_the_prefix():
    index = PrefixIndex()
    index.insert("r0", [1, 3, 4])  # block 2 missing
    assert index.match([1, 2, 3, 4]) == {"r0": 1}


def test_matches_real_block_hash_chains():
    shared = list(range(64))
    a = block_hash_chain(shared + [1] * 32, 16)
    b = block_hash_chain(shared + [2] * 32, 16)
    index = PrefixIndex()
    index.insert("r0", a)
    assert index.match(b) == {"r0": 4}  # the 4 shared leading blocks
    assert index.match(a) == {"r0": 6}


def test_lru_bound_evicts_tails_before_heads():
    index = PrefixIndex(capacity_blocks=6)
    index.insert("r0", [1, 2, 3, 4])
    index.insert("r1", [10, 11, 12, 13])
    assert len(index) == 6
    # The oldest chain lost its tail first: its head still matches.
    assert index.match([1, 2, 3, 4]) == {"r0": 2}
    assert index.match([10, 11, 12, 13]) == {"r1": 4}
    assert index.num_blocks("r0") == 2


def test_match_touches_blocks():
    index = PrefixIndex(capacity_blocks=4)
    index.insert("r0", [1, 2])
    index.insert("r1", [5, 6])
    index.match([1, 2])  # now [1, 2] is most recent
    index.insert("r1", [7, 8])
    assert index.match([1, 2]) == {"r0": 2}
    assert index.match([5, 6]) == {}


def test_remove_replica():
    index = PrefixIndex()
    index.insert("r0", [1, 2, 3])
    index.insert("r1", [1, 2])
    index.remove_replica("r0")
    assert index.match([1, 2, 3]) == {"r1": 2}
    assert index.num_blocks("r0") == 0 and len(index) == 2
    index.remove_replica("r1")
    assert len(index) == 0 and index.replica_ids == []
    index.remove_replica("unknown")  # no error


def test_replace_replica_blocks():
    index = PrefixIndex()
    index.insert("r0", [1, 2, 3, 4])
    index.insert("r1", [1, 2])
    index.replace_replica_blocks("r0", [1, 2, 7])
    assert index.match([1, 2, 3, 4]) == {"r0": 2, "r1": 2}
    assert index.blocks_of("r0") == {1, 2, 7}
    assert index.num_blocks("r1") == 2
    assert len(index) == 3  # 3 and 4 had no other holder


@settings(max_examples=200, deadline=None)
@given(chains=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]),
                                 st.lists(st.integers(0, 12), max_size=6)), max_size=12),
       query=st.lists(st.integers(0, 12), max_size=6))
def test_match_equals_brute_force_without_eviction(chains, query):
    index = PrefixIndex()
    held: dict[str, set[int]] = {}
    for replica_id, chain in chains:
        index.insert(replica_id, chain)
        held.setdefault(replica_id, set()).update(chain)
    expected = {}
    for replica_id, blocks in held.items():
        n = 0
        while n < len(query) and query[n] in blocks:
            n += 1
        if n:
            expected[replica_id] = n
    assert index.match(query) == expected


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.lists(st.integers(0, 30), max_size=8)),
                    max_size=20), capacity=st.integers(1, 10))
def test_capacity_and_invariants_hold(ops, capacity):
    index = PrefixIndex(capacity_blocks=capacity)
    for replica_id, chain in ops:
        index.insert(replica_id, chain)
        assert len(index) <= capacity
    for replica_id in index.replica_ids:
        for block_hash in index.blocks_of(replica_id):
            assert replica_id in index._holders[block_hash]
    for block_hash, holders in index._holders.items():
        assert holders
        for replica_id in holders:
            assert block_hash in index.blocks_of(replica_id)


def test_replace_keeps_known_blocks_in_place_and_adds_new_ones_as_newest():
    index = PrefixIndex(capacity_blocks=4)
    index.insert("r0", [1, 2])
    index.insert("r1", [3, 4])  # LRU order, oldest first: 2, 1, 4, 3
    index.replace_replica_blocks("r0", [1, 2])  # nothing new: no reordering
    index.insert("r1", [5])  # over capacity: evicts the oldest, block 2
    assert index.blocks_of("r0") == {1} and index.blocks_of("r1") == {3, 4, 5}
    # LRU now 1, 4, 3, 5: 6 and 7 come in as the newest, and 1 (not touched by a report) and
    # 4, the two oldest, make room
    index.replace_replica_blocks("r0", [1, 6, 7])
    assert index.blocks_of("r0") == {6, 7} and index.blocks_of("r1") == {3, 5}


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b"]),
                                st.lists(st.integers(0, 15), max_size=8)), max_size=15))
def test_replace_holds_exactly_the_report_and_the_invariant(steps):
    index = PrefixIndex()
    held: dict[str, set[int]] = {}
    for replace, replica_id, blocks in steps:
        if replace:
            index.replace_replica_blocks(replica_id, blocks)
            held[replica_id] = set(blocks)
        else:
            index.insert(replica_id, blocks)
            held.setdefault(replica_id, set()).update(blocks)
    for replica_id, blocks in held.items():
        assert index.blocks_of(replica_id) == blocks
    assert len(index) == len(set().union(*held.values())) if held else len(index) == 0
    for block_hash in set().union(*held.values()) if held else ():
        assert index._holders[block_hash] == {r for r, b in held.items() if block_hash in b}
