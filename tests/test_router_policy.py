"""Unit tests of the prefix-affinity routing policy on plain objects."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from router.policy import (DecisionKind, ReplicaLoad, ReplicaView, RouterPolicyConfig,
                           RoutingPolicyKind, choose)

ROOT = Path(__file__).resolve().parents[1]
CHAIN = list(range(100, 132))  # a 32-block request


def view(replica_id, matched=0, queue_depth=0, inflight=0, tokens=0, cached=0):
    return ReplicaView(replica_id, ReplicaLoad(queue_depth=queue_depth, inflight_requests=inflight,
                                               inflight_tokens=tokens), matched, cached)


def test_policy_and_index_import_neither_torch_nor_ray():
    code = ("import sys, router.policy, router.prefix_index, router.autoscaling; "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_affinity_wins_when_loads_are_balanced():
    replicas = [view("a", inflight=1), view("b", matched=20, inflight=2), view("c", inflight=1)]
    decision = choose(CHAIN, replicas, random.Random(0))
    assert decision.kind is DecisionKind.AFFINITY
    assert decision.replica_id == "b"
    assert decision.matched_blocks == 20
    assert sorted(decision.ranked_replica_ids) == ["a", "b", "c"]


def test_longer_match_beats_shorter_and_load_trades_against_blocks():
    cfg = RouterPolicyConfig(load_weight=4.0)
    replicas = [view("a", matched=10), view("b", matched=20, inflight=2)]
    # b: 20 - 4*2 = 12 > a: 10 - 0 = 10
    assert choose(CHAIN, replicas, random.Random(0), cfg).replica_id == "b"
    replicas = [view("a", matched=10), view("b", matched=20, inflight=3)]
    # b: 20 - 12 = 8 < 10
    assert choose(CHAIN, replicas, random.Random(0), cfg).replica_id == "a"


def test_imbalance_guard_fires_when_owner_is_flooded():
    cfg = RouterPolicyConfig(imbalance_threshold=8.0)
    replicas = [view("a", matched=32, inflight=20), view("b", inflight=2), view("c", inflight=5)]
    decision = choose(CHAIN, replicas, random.Random(0), cfg)
    assert decision.kind is DecisionKind.LOAD_OVERRIDE
    assert decision.ranked_replica_ids == ["b", "c", "a"]


def test_imbalance_threshold_is_respected_exactly():
    cfg = RouterPolicyConfig(imbalance_threshold=8.0, load_weight=0.0)
    at = [view("a", matched=4, inflight=8), view("b")]
    assert choose(CHAIN, at, random.Random(0), cfg).kind is DecisionKind.AFFINITY
    over = [view("a", matched=4, inflight=9), view("b")]
    assert choose(CHAIN, over, random.Random(0), cfg).kind is DecisionKind.LOAD_OVERRIDE


def test_unrelated_flooded_replica_does_not_disable_affinity():
    replicas = [view("a", matched=16, inflight=1), view("b", inflight=50), view("c", inflight=0)]
    decision = choose(CHAIN, replicas, random.Random(0))
    assert decision.kind is DecisionKind.AFFINITY and decision.replica_id == "a"


def test_min_match_blocks_threshold():
    cfg = RouterPolicyConfig(min_match_blocks=4)
    replicas = [view("a", matched=3), view("b"), view("c")]
    assert choose(CHAIN, replicas, random.Random(0), cfg).kind is DecisionKind.FALLBACK_P2C
    replicas = [view("a", matched=4), view("b"), view("c")]
    assert choose(CHAIN, replicas, random.Random(0), cfg).kind is DecisionKind.AFFINITY


def test_inflight_tokens_count_as_load():
    cfg = RouterPolicyConfig(inflight_tokens_per_load_unit=1000)
    assert ReplicaLoad(inflight_requests=1, inflight_tokens=3000).units(cfg) == 4.0
    # The replica's own report corrects a router that saw fewer requests.
    assert ReplicaLoad(queue_depth=5, running=2, inflight_requests=3).units(cfg) == 7.0


def test_p2c_picks_less_loaded_of_two_and_ranks_everyone():
    replicas = [view("a", inflight=5), view("b", inflight=1), view("c", inflight=3)]
    for seed in range(20):
        decision = choose(CHAIN, replicas, random.Random(seed))
        assert decision.kind is DecisionKind.FALLBACK_P2C
        assert decision.replica_id != "a"  # a is the max: never the better of two
        assert sorted(decision.ranked_replica_ids) == ["a", "b", "c"]


def test_p2c_spreads_distinct_cold_prefixes():
    """Sequential cold prefixes: each lands, is indexed, and the next one prefers emptier caches."""
    rng = random.Random(1)
    cached = {"a": 0, "b": 0, "c": 0}
    chosen = []
    for _ in range(3):
        replicas = [view(r, cached=n) for r, n in cached.items()]
        replica_id = choose(CHAIN, replicas, rng).replica_id
        cached[replica_id] += 32
        chosen.append(replica_id)
    assert len(set(chosen)) >= 2
    # Over many prefixes the spread is even-ish.
    counts = {"a": 0, "b": 0, "c": 0}
    for i in range(300):
        replicas = [view(r, cached=counts[r]) for r in counts]
        counts[choose(CHAIN, replicas, rng).replica_id] += 1
    assert max(counts.values()) - min(counts.values()) <= 30


def test_burst_with_inflight_counting_spreads():
    rng = random.Random(0)
    inflight = {"a": 0, "b": 0, "c": 0}
    for _ in range(30):
        decision = choose(CHAIN, [view(r, inflight=n) for r, n in inflight.items()], rng)
        inflight[decision.replica_id] += 1
    assert max(inflight.values()) <= 15


def test_no_hashes_means_load_only():
    replicas = [view("a", matched=30, inflight=3), view("b", inflight=0)]
    decision = choose([], replicas, random.Random(0))
    assert decision.kind is DecisionKind.FALLBACK_P2C and decision.replica_id == "b"


def test_power_of_two_policy_ignores_prefixes():
    cfg = RouterPolicyConfig(policy=RoutingPolicyKind.POWER_OF_TWO)
    replicas = [view("a", matched=30, inflight=3), view("b")]
    assert choose(CHAIN, replicas, random.Random(0), cfg).replica_id == "b"


def test_saturated_when_all_replicas_at_max_load():
    cfg = RouterPolicyConfig(max_load_per_replica=4)
    replicas = [view("a", inflight=4), view("b", inflight=6)]
    decision = choose(CHAIN, replicas, random.Random(0), cfg)
    assert decision.kind is DecisionKind.SATURATED and decision.ranked_replica_ids == ["a", "b"]
    replicas = [view("a", inflight=3), view("b", inflight=6)]
    assert choose(CHAIN, replicas, random.Random(0), cfg).kind is not DecisionKind.SATURATED


def test_no_replicas():
    assert choose(CHAIN, [], random.Random(0)).kind is DecisionKind.NO_REPLICAS


@pytest.mark.parametrize("kwargs", [
    {"min_match_blocks": 0}, {"load_weight": -1}, {"imbalance_threshold": -0.5},
    {"inflight_tokens_per_load_unit": 0}, {"max_load_per_replica": 0},
    {"index_capacity_blocks": 0}, {"policy": "prefix_affinity"},
])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        RouterPolicyConfig(**kwargs)


def test_config_dict_round_trip():
    cfg = RouterPolicyConfig(min_match_blocks=2, policy=RoutingPolicyKind.POWER_OF_TWO,
                             max_load_per_replica=10.0)
    assert RouterPolicyConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        RouterPolicyConfig.from_dict({"bogus": 1})
