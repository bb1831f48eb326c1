"""The LL all-reduce and its fused residual add + RMSNorm (engine/distributed/ll_allreduce.py).

Ranks are spawned processes, one GPU each (``bench/ll_allreduce.py``'s ``rank_main`` through
``bench/custom_allreduce.py``'s ``run_ranks``, which kills every rank at a deadline, so a
deadlock fails instead of hanging). Each rank checks both modes against NCCL + the Triton norm
over dtypes, hidden sizes and row counts, bit-identical results on every rank, 1000 back-to-back
calls of changing row counts (the per-row rounds and parities) with NCCL-sized calls between, and
100 CUDA graph replays with new inputs. Run with ``-s`` for the latency table.
"""

from __future__ import annotations

import pytest

from bench.custom_allreduce import check_reports, run_ranks
from bench.ll_allreduce import rank_main

pytestmark = pytest.mark.multigpu
PATH = "LL all-reduce"


def test_two_ranks():
    check_reports(run_ranks(2, isolated=True, target=rank_main), 2, expect_enabled=True, path=PATH)


def test_opt_out_on_one_rank_turns_it_off_everywhere():
    reports = run_ranks(2, isolated=True, disable_ranks=(1,), target=rank_main)
    check_reports(reports, 2, expect_enabled=False, path=PATH)
    assert "KVMESH_DISABLE_LL_ALLREDUCE" in reports[1]["reason"]


@pytest.mark.multigpu4
def test_four_ranks():
    check_reports(run_ranks(4, isolated=True, target=rank_main), 4, expect_enabled=True, path=PATH)
