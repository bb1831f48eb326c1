"""The LL all-reduce and its fused residual add + RMSNorm (engine/distributed/ll_allreduce.py).

Ranks are spawned processes, one GPU each (``bench/ll_allreduce.py``'s ``rank_main`` through
``bench/custom_allreduce.py``'s ``run_ranks``, which kills every rank at a deadline, so a
deadlock fails instead of hanging). Each rank checks both modes against NCCL + the Triton norm
over dtypes, hidden sizes and row counts, bit-identical results on every rank, 1000 back-to-back
calls of changing row counts (the per-row rounds and parities) with NCCL-sized calls between, and
100 CUDA graph replays with new inputs. Run with ``-s`` for the latency table.
"""

from __future__ import annotations

import json

import pytest

from bench.custom_allreduce import run_ranks
from bench.ll_allreduce import rank_main

pytestmark = pytest.mark.multigpu


def _assert_reports(reports: dict, world: int, expect_enabled: bool) -> None:
    assert sorted(reports) == list(range(world))
    for rank, report in sorted(reports.items()):
        assert report["failures"] == [], f"rank {rank}: {report['failures'][:20]}"
        assert report["enabled"] is expect_enabled, (
            f"rank {rank}: LL all-reduce enabled={report['enabled']}, expected {expect_enabled}; "
            f"reason: {report['reason']}")
    print(f"latency us (world {world}, rank 0): {json.dumps(reports[0]['latency_us'], indent=1)}")


def test_two_ranks():
    _assert_reports(run_ranks(2, isolated=True, target=rank_main), 2, expect_enabled=True)


def test_opt_out_on_one_rank_turns_it_off_everywhere():
    reports = run_ranks(2, isolated=True, disable_ranks=(1,), target=rank_main)
    _assert_reports(reports, 2, expect_enabled=False)
    assert "KVMESH_DISABLE_LL_ALLREDUCE" in reports[1]["reason"]


@pytest.mark.multigpu4
def test_four_ranks():
    _assert_reports(run_ranks(4, isolated=True, target=rank_main), 4, expect_enabled=True)
