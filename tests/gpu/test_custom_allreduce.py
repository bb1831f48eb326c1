"""The one-shot IPC all-reduce (engine/distributed/custom_allreduce.py) on 2 and 4 GPUs.

Ranks are spawned processes (``bench/custom_allreduce.py``'s ``run_ranks``), with a deadline
after which all are killed, so a deadlock fails the test instead of hanging it. Each rank checks:
results equal NCCL's for 1 element .. 512 KiB in bf16/fp16/fp32, odd sizes and misaligned views,
and are bit-identical on every rank; 1000 back-to-back calls of changing sizes (NCCL-sized ones
between) are exact; a CUDA graph of custom all-reduces replayed 100 times with new inputs equals
NCCL. Configurations: every rank seeing only its GPU (``CUDA_VISIBLE_DEVICES``, as the engine's
Ray workers do) and every rank seeing all GPUs; the opt-out variable set on one rank turns the
path off on all of them (no hang, NCCL results). The latency table (custom vs NCCL, eager and
in a CUDA graph) is printed: run with ``-s`` to see it.
"""

from __future__ import annotations

import pytest

from bench.custom_allreduce import check_reports, run_ranks

pytestmark = pytest.mark.multigpu


def test_two_ranks_one_visible_gpu_each():
    """The engine's configuration: each worker sees one GPU; IPC between the processes."""
    check_reports(run_ranks(2, isolated=True), 2, expect_enabled=True)


def test_two_ranks_all_gpus_visible():
    check_reports(run_ranks(2, isolated=False), 2, expect_enabled=True)


def test_opt_out_on_one_rank_turns_it_off_everywhere():
    reports = run_ranks(2, isolated=True, disable_ranks=(1,))
    check_reports(reports, 2, expect_enabled=False)
    assert "KVMESH_DISABLE_CUSTOM_ALLREDUCE" in reports[1]["reason"]


@pytest.mark.multigpu4
def test_four_ranks_one_visible_gpu_each():
    check_reports(run_ranks(4, isolated=True), 4, expect_enabled=True)
