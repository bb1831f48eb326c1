"""A replica's routing stats carry its prefix cache's block hashes every
``routing.block_report_period_s`` only, and a decode-pool replica's never (router/replica.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from router.config import RoutingConfig, parse_deployment_config
from router.disagg import DecodeServer
from router.replica import LLMServer


def fake_replica(cls, period_s: float):
    stats = SimpleNamespace(num_waiting=1, num_running=2, kv_usage=0.5, prefix_cache_hit_rate=0.0,
                            num_preemptions=0, cached_block_hashes=[11, 12, 13], num_free_blocks=7,
                            num_blocks=10)
    replica = SimpleNamespace(engine=SimpleNamespace(get_stats=lambda: stats),
                              cfg=SimpleNamespace(routing=RoutingConfig(block_report_period_s=period_s)),
                              reports_block_hashes=cls.reports_block_hashes, _next_block_report=0.0)
    return lambda: cls.record_routing_stats(replica)


def test_hashes_go_along_once_a_period_and_loads_every_time():
    report = fake_replica(LLMServer, period_s=0.3)
    first, second = report(), report()
    assert first["cached_block_hashes"] == [11, 12, 13]
    assert second["cached_block_hashes"] == []  # "not reported": the routers keep their index
    assert first["num_waiting"] == second["num_waiting"] == 1 and second["num_free_blocks"] == 7
    time.sleep(0.35)
    assert report()["cached_block_hashes"] == [11, 12, 13]


def test_decode_pool_never_reports_hashes():
    report = fake_replica(DecodeServer, period_s=0.01)
    assert all(report()["cached_block_hashes"] == [] for _ in range(3))
    assert report()["num_free_blocks"] == 7  # what its router does use


def test_bad_period_is_refused_at_load():
    with pytest.raises(ValueError, match="block_report_period_s must be > 0"):
        parse_deployment_config({"name": "x", "model": "m", "routing": {"block_report_period_s": 0}})
