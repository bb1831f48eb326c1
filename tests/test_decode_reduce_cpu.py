"""The fused decode-split merge (``paged_decode(split_counts=...)``) on the CPU.

The last split of each (request, KV head) to finish merges the splits itself instead of a
reduce launch after the decode kernel. Run in Triton's CPU interpreter (switched on before
Triton is imported: ``test_in_triton_interpreter`` reruns this file in a subprocess with
``TRITON_INTERPRET=1``; the interpreted tests skip otherwise), which runs the programs one
after another, so the last program of a (request, KV head) is the one that merges. Checked:
the same bits as the separate reduce kernel, every split count and empty splits included;
a request with no token this step untouched; the counts zero again after every call, so
the next call (the next layer, the next CUDA graph replay) starts clean; a bad counts
tensor refused. The GPU versions (real concurrency, CUDA graphs) are in
tests/gpu/test_triton_attention.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_in_triton_interpreter's subprocess")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _interpreter_scalars():
    if INTERPRETED:
        from tests.gpu.test_triton_attention import patch_interpreter_scalars
        patch_interpreter_scalars()


def _decode(case, num_splits: int, counts=None) -> torch.Tensor:
    from engine.attention import triton_kernels as tk
    out = torch.full_like(case.query, float("nan"))
    tk.paged_decode(case.query, case.kv_cache, case.meta.block_tables, case.meta.seq_lens,
                    case.meta.query_start_loc, case.meta.num_reqs, case.scale, out, num_splits,
                    block_n=16, min_split_len=16, split_counts=counts)
    return out


@interpreted
@pytest.mark.parametrize("num_splits", [2, 3, 8])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4), (8, 1)])
def test_fused_merge_matches_the_reduce_kernel(num_splits, hq, hkv):
    from tests.gpu.test_triton_attention import make_case
    # contexts with every split used, some splits empty, and a single key
    lens = [(c, 1) for c in (0, 15, 40, 129, 300)]
    case = make_case(lens, hq, hkv, 32, 16, torch.float32, "cpu", seed=num_splits * 10 + hkv)
    counts = torch.zeros(64, dtype=torch.int32)
    for _ in range(2):  # the second call finds the counts the first one left
        fused = _decode(case, num_splits, counts)
        assert torch.equal(fused, _decode(case, num_splits)), "fused merge differs from the reduce kernel"
        assert not fused.isnan().any()
        assert int(counts.abs().sum()) == 0, f"counts left at {counts.tolist()}"


@interpreted
def test_request_without_a_token_is_left_alone():
    from tests.gpu.test_triton_attention import make_case
    case = make_case([(50, 1), (70, 1)], 8, 2, 32, 16, torch.float32, "cpu", seed=3)
    case.meta.query_start_loc[2] = case.meta.query_start_loc[1]  # request 1: no token this step
    counts = torch.zeros(16, dtype=torch.int32)
    out = _decode(case, 4, counts)
    assert not out[0].isnan().any() and out[1].isnan().all()
    assert int(counts.abs().sum()) == 0


def test_bad_counts_are_refused():
    from engine.attention import triton_kernels as tk
    q = torch.zeros(2, 8, 32)
    cache = torch.zeros(2, 4, 16, 2, 32)
    args = (q, cache, torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, dtype=torch.int32),
            torch.tensor([0, 1, 2], dtype=torch.int32), 2, 1.0, torch.empty_like(q), 4)
    with pytest.raises(ValueError, match="split_counts must be int32 with >= 4"):
        tk.paged_decode(*args, split_counts=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        tk.paged_decode(*args, split_counts=torch.zeros(8, dtype=torch.int64))


def test_backend_keeps_one_counts_tensor_and_never_frees_one_a_graph_may_hold():
    from engine.attention.triton_backend import TritonBackend
    backend = TritonBackend()
    first = backend._counts(torch.device("cpu"), 16)
    assert first.numel() == 4096 and first.dtype == torch.int32
    assert backend._counts(torch.device("cpu"), 4096) is first
    bigger = backend._counts(torch.device("cpu"), 5000)
    assert bigger.numel() == 5000 and any(t is first for t in backend._retired_counts)


def test_in_triton_interpreter():
    if INTERPRETED:
        pytest.skip("already the interpreter's run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-k", "fused_merge or without_a_token", os.path.abspath(__file__)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "10 passed" in res.stdout, res.stdout[-2000:]
