"""The LL all-reduce on ONE GPU, every rank a thread of this process (bench/ll_loopback.py).

What ``test_ll_allreduce`` checks across GPUs, as far as one GPU can: the set-up's self-check
passes; both modes (sum; residual add + RMSNorm) give every rank the same bits, equal to the
reference; back-to-back calls of changing row counts (the rounds and parities) stay right; the
GEMV that pushes its outputs into the peers' slots gives what the plain GEMV then the LL call
give, with the LL call waiting for that GEMV to end or not (no-wait: it reads only flagged
lines), in any issue order; and a call's stamps (``KVMESH_LL_STAMPS``) come in order. Runs where only one GPU is lent.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bench.ll_loopback import EPS, LoopbackGroup, rank_inputs

pytestmark = pytest.mark.gpu
# The rank threads need every kernel loaded at CUDA's start (bench/ll_loopback.py), which only
# a fresh process can choose: test_in_eager_subprocess reruns this file with it.
EAGER = os.environ.get("CUDA_MODULE_LOADING") == "EAGER" and os.environ.get("KVMESH_LOOPBACK_CHILD") == "1"
eager = pytest.mark.skipif(not EAGER, reason="runs in test_in_eager_subprocess (CUDA_MODULE_LOADING=EAGER)")


def test_in_eager_subprocess():
    if EAGER:
        pytest.skip("already the subprocess")
    env = dict(os.environ, CUDA_MODULE_LOADING="EAGER", KVMESH_LOOPBACK_CHILD="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" in proc.stdout  # this test skips there


def _reference(xs: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor):
    """(out, residual_out) as NCCL's sum then the norm would give them (fp32 sum, rounded)."""
    summed = sum(x.float() for x in xs).to(xs[0].dtype)
    res = (summed.float() + residual.float()).to(summed.dtype)
    r32 = res.float()
    return weight * (r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + EPS)).to(summed.dtype), res


@pytest.fixture
def group_of():
    groups = []

    def make(world: int, stamps: bool = False) -> LoopbackGroup:
        groups.append(LoopbackGroup(world, stamps=stamps))
        return groups[-1]

    yield make
    for group in groups:
        group.close()


@eager
@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_gets_the_same_bits_and_the_reference(world, group_of):
    group = group_of(world)
    cases = [(1, 4096, torch.bfloat16), (3, 4096, torch.bfloat16), (1, 5120, torch.float16),
             (2, 64, torch.bfloat16)] * 3  # changing rows and dtypes: every round and parity
    for call, (rows, hidden, dtype) in enumerate(cases):
        xs = [rank_inputs(q, rows, hidden, dtype, call)[0] for q in range(world)]
        residual, weight = rank_inputs(0, rows, hidden, dtype, 1000 + call)[1:]  # the same on every rank
        normed = group.issue(lambda r, ll: ll.all_reduce_rms_norm(xs[r], residual, weight, EPS))
        sums = group.issue(lambda r, ll: ll.all_reduce(xs[r]))
        group.synchronize()
        want, want_res = _reference(xs, residual, weight)
        for rank in range(world):
            got, got_res = normed[rank]
            assert torch.allclose(got_res.float(), want_res.float(), rtol=1e-2, atol=1e-2 * world)
            assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * world)
            assert torch.allclose(sums[rank].float(), sum(v.float() for v in xs), rtol=1e-2, atol=1e-2 * world)
            assert torch.equal(got, normed[0][0]) and torch.equal(got_res, normed[0][1]), f"rank {rank}: other bits"
            assert torch.equal(sums[rank], sums[0]), f"rank {rank}: other bits"


def _pushing_case(world: int):
    """Per rank a (1, 2048) row and a (4096, 2048) weight, the shape tuned for the one-row GEMV
    (before any LL kernel runs), and the call's residual and norm weight."""
    from engine.kernels import gemv
    gen = torch.Generator(device="cuda").manual_seed(77)
    a = [torch.randn(1, 2048, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(world)]
    w = [(torch.randn(4096, 2048, generator=gen, device="cuda") / 2048 ** 0.5).to(torch.bfloat16)
         for _ in range(world)]
    residual, weight = rank_inputs(0, 1, 4096, torch.bfloat16, 5)[1:]
    gemv.gemv_row(a[0], w[0])
    gemv._USE_GEMV[(4096, 2048, torch.bfloat16)] = ("row", None)
    return a, w, residual, weight


@eager
@pytest.mark.parametrize("no_wait", [False, True], ids=["wait", "no_wait"])
def test_the_pushing_gemv_gives_what_the_plain_gemv_then_the_call_give(group_of, no_wait):
    from engine.kernels import gemv
    a, w, residual, weight = _pushing_case(2)
    group = group_of(2)
    for ll in group.lls:
        ll.no_wait = no_wait
    for _ in range(3):  # GEMVs of every rank first (they never wait), then the LL calls
        plain = group.issue(lambda r, ll: gemv.gemv_row(a[r], w[r]))
        want = group.issue(lambda r, ll: ll.all_reduce_rms_norm(plain[r], residual, weight, EPS))
        pushed = group.issue(lambda r, ll: ll.gemv_push(a[r], w[r]))
        assert all(p is not None for p in pushed), "gemv_push refused a tuned one-row shape"
        got = group.issue(lambda r, ll: ll.all_reduce_rms_norm(pushed[r], residual, weight, EPS))
        summed = group.issue(lambda r, ll: ll.all_reduce(ll.gemv_push(a[r], w[r])))
        want_sum = group.issue(lambda r, ll: ll.all_reduce(plain[r]))
        group.synchronize()
        for r in range(2):
            if not no_wait:  # no-wait leaves the GEMV's own output unwritten: only the slots hold it
                assert torch.equal(pushed[r], plain[r])
            assert torch.equal(got[r][0], want[r][0]) and torch.equal(got[r][1], want[r][1])
            assert torch.equal(summed[r], want_sum[r])
        assert torch.equal(got[0][0], got[1][0])


@eager
@pytest.mark.parametrize("world", [2, 4])
def test_no_wait_calls_wait_for_every_line_in_any_issue_order(group_of, world):
    """Each rank's GEMV then its no-wait LL call, rank after rank: rank 0's call runs before any
    peer's GEMV was even issued, so it has only the flags to wait on (its own lines included,
    as it does not wait for its GEMV to end). Ranks mix modes (rank 1 waits), over rounds of
    both parities, in a CUDA graph-free loop; every rank must get the plain path's bits."""
    from engine.kernels import gemv
    a, w, residual, weight = _pushing_case(world)
    group = group_of(world)
    for rank, ll in enumerate(group.lls):
        ll.no_wait = rank != 1
    plain = group.issue(lambda r, ll: gemv.gemv_row(a[r], w[r]))
    want = group.issue(lambda r, ll: ll.all_reduce_rms_norm(plain[r], residual, weight, EPS))
    # Every rank's pushing GEMV once before any LL call spins: a kernel's first launch loads it
    # (Triton specializes on the rank), and a load may wait for the spinning call (a deadlock)
    warm = group.issue(lambda r, ll: ll.gemv_push(a[r], w[r]))
    group.issue(lambda r, ll: ll.all_reduce_rms_norm(warm[r], residual, weight, EPS))
    group.synchronize()
    for _ in range(6):
        got = group.issue(lambda r, ll: ll.all_reduce_rms_norm(ll.gemv_push(a[r], w[r]), residual, weight, EPS))
        group.synchronize()
        for r in range(world):
            assert torch.equal(got[r][0], want[r][0]) and torch.equal(got[r][1], want[r][1]), f"rank {r}"


@eager
def test_stamps_come_in_order_one_per_call(group_of):
    from engine.profiling import ll_stamp_summary
    group = group_of(2, stamps=True)
    inputs = [rank_inputs(r, 1, 4096, torch.bfloat16, 3) for r in range(2)]
    for _ in range(50):
        group.issue(lambda r, ll: ll.all_reduce_rms_norm(*inputs[r], EPS))
    group.synchronize()
    for ll in group.lls:
        stamps = ll.read_stamps()
        assert len(stamps) == 50  # the self-check is skipped here: these calls only
        for start, waited, peers_in, end in stamps:
            assert start <= waited <= peers_in <= end
        summary = ll_stamp_summary(stamps)
        assert summary["num_calls"] == 50 and summary["after_wait_us"]["median"] > 0
