"""The LL all-reduce on ONE GPU, every rank a thread of this process (bench/ll_loopback.py).

What ``test_ll_allreduce`` checks across GPUs, as far as one GPU can: the set-up's self-check
passes; both modes (sum; residual add + RMSNorm) give every rank the same bits, equal to the
reference; back-to-back calls of changing row counts (the rounds and parities) stay right; the
GEMV that pushes its outputs into the peers' slots gives what the plain GEMV then the LL call
give; and a call's stamps (``KVMESH_LL_STAMPS``) come in order. Runs where only one GPU is lent.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bench.ll_loopback import EPS, run_ranks

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


def _inputs(rank: int, rows: int, hidden: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed * 131 + rank)
    x = torch.randn(rows, hidden, generator=gen, device="cuda").to(dtype)
    residual = torch.randn(rows, hidden, generator=gen, device="cuda").to(dtype)
    weight = (torch.rand(hidden, generator=gen, device="cuda") + 0.5).to(dtype)
    return x, residual, weight


def _reference(xs: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor):
    """(out, residual_out) as NCCL's sum then the norm would give them (fp32 sum, rounded)."""
    summed = sum(x.float() for x in xs).to(xs[0].dtype)
    res = (summed.float() + residual.float()).to(summed.dtype)
    r32 = res.float()
    return weight * (r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + EPS)).to(summed.dtype), res


@eager
@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_gets_the_same_bits_and_the_reference(world):
    def body(rank, ll, comm):
        out = []
        for call, (rows, hidden, dtype) in enumerate([(1, 4096, torch.bfloat16), (3, 4096, torch.bfloat16),
                                                      (1, 5120, torch.float16), (2, 64, torch.bfloat16)] * 3):
            x, residual, weight = _inputs(rank, rows, hidden, dtype, call)
            xs = [_inputs(q, rows, hidden, dtype, call)[0] for q in range(world)]
            residual, weight = _inputs(0, rows, hidden, dtype, 1000 + call)[1:]  # the same on every rank
            got, got_res = ll.all_reduce_rms_norm(x, residual, weight, EPS)
            total = ll.all_reduce(x)
            want, want_res = _reference(xs, residual, weight)
            torch.cuda.current_stream().synchronize()
            assert torch.allclose(got_res.float(), want_res.float(), rtol=1e-2, atol=1e-2 * world)
            assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * world)
            assert torch.allclose(total.float(), sum(v.float() for v in xs), rtol=1e-2, atol=1e-2 * world)
            out.append((got.cpu(), got_res.cpu(), total.cpu()))
        return out

    per_rank = run_ranks(world, body)
    for rank in range(1, world):
        for mine, first in zip(per_rank[rank], per_rank[0]):
            assert all(torch.equal(a, b) for a, b in zip(mine, first)), f"rank {rank} differs from rank 0"


@eager
def test_the_pushing_gemv_gives_what_the_plain_gemv_then_the_call_give():
    from engine.kernels import gemv

    def body(rank, ll, comm):
        gen = torch.Generator(device="cuda").manual_seed(77 + rank)
        a = torch.randn(1, 2048, generator=gen, device="cuda").to(torch.bfloat16)
        w = (torch.randn(4096, 2048, generator=gen, device="cuda") / 2048 ** 0.5).to(torch.bfloat16)
        residual, weight = _inputs(0, 1, 4096, torch.bfloat16, 5)[1:]
        if rank == 0:
            gemv.gemv_row(a, w)  # tunes the shape (one thread at a time: the autotuner's cache)
            gemv._USE_GEMV[(4096, 2048, torch.bfloat16)] = ("row", None)
        comm.hub.barrier.wait()
        plain = gemv.gemv_row(a, w)
        want = ll.all_reduce_rms_norm(plain, residual, weight, EPS)
        pushed = ll.gemv_push(a, w)
        assert pushed is not None, "gemv_push refused a tuned one-row shape"
        got = ll.all_reduce_rms_norm(pushed, residual, weight, EPS)
        torch.cuda.current_stream().synchronize()
        assert torch.equal(pushed, plain)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        return got[0].cpu()

    outs = run_ranks(2, body)
    assert torch.equal(outs[0], outs[1])


@eager
def test_stamps_come_in_order_one_per_call():
    from engine.profiling import ll_stamp_summary

    def body(rank, ll, comm):
        x, residual, weight = _inputs(rank, 1, 4096, torch.bfloat16, 3)
        before = len(ll.read_stamps())  # the set-up's self-check calls stamp too
        for _ in range(50):
            ll.all_reduce_rms_norm(x, residual, weight, EPS)
        torch.cuda.current_stream().synchronize()
        comm.hub.barrier.wait()
        return before, ll.read_stamps()

    for before, stamps in run_ranks(2, body, stamps=True):
        assert len(stamps) == min(before + 50, 4096)
        for start, waited, peers_in, end in stamps:
            assert start <= waited <= peers_in <= end
        summary = ll_stamp_summary(stamps[-50:])
        assert summary["num_calls"] == 50 and summary["after_wait_us"]["median"] > 0
