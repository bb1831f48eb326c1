"""The fused decode reduce (``paged_decode(fused_reduce=True)``) on the CPU, in Triton's interpreter.

The last split of each (request, KV head) to finish merges the splits, instead of a second
launch. Checked bit for bit against the two-launch path, over split counts (1, 2, 3, 7, 32)
and context lengths around the split edges (no context, one tile, a split and one key, long):
and launched twice on the same counters (the merging program resets its own, so the second
launch must give the same bits and leave every counter at zero). A run with fewer active
splits than launched (short contexts) checks that the merge waits for the active ones only.

The interpreter must be switched on before Triton is imported: under plain pytest,
``test_in_triton_interpreter`` reruns this file in a subprocess with ``TRITON_INTERPRET=1``.
The GPU version is ``test_fused_decode_reduce_same_bits`` in tests/gpu/test_triton_attention.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.gpu.test_triton_attention import make_case

triton = pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_in_triton_interpreter's subprocess")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LENS = [(0, 1), (15, 1), (16, 1), (63, 1), (64, 1), (130, 1), (400, 1)]  # (context, 1 query token)


@pytest.fixture(autouse=True)
def _interpreter_scalars():
    if INTERPRETED:
        from tests.gpu.test_triton_attention import patch_interpreter_scalars
        patch_interpreter_scalars()


def _decode(case, num_splits: int, fused: bool) -> torch.Tensor:
    from engine.attention import triton_kernels as tk
    out = torch.full_like(case.query, float("nan"))
    meta = case.meta
    tk.paged_decode(case.query, case.kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                    meta.num_reqs, case.scale, out, num_splits, block_n=16, min_split_len=16,
                    fused_reduce=fused)
    return out


@interpreted
@pytest.mark.parametrize("num_splits,heads", [(1, (8, 2)), (2, (8, 2)), (3, (8, 2)), (7, (8, 2)),
                                              (32, (8, 2)), (3, (4, 4))])
def test_fused_reduce_is_the_reduce_launch_bit_for_bit(num_splits, heads):
    from engine.attention import triton_kernels as tk
    case = make_case(LENS, heads[0], heads[1], 32, 16, torch.float32, "cpu", seed=num_splits)
    two_launches = _decode(case, num_splits, fused=False)
    fused = _decode(case, num_splits, fused=True)
    assert not fused.isnan().any()
    assert torch.equal(fused, two_launches)
    assert torch.equal(_decode(case, num_splits, fused=True), two_launches)  # counters reset
    counters = tk.split_counters(torch.device("cpu"), 1)
    assert counters is not None and int(counters.abs().sum()) == 0


@interpreted
def test_split_counters_grow_and_keep_the_old_buffer():
    from engine.attention import triton_kernels as tk
    device = torch.device("cpu")
    first = tk.split_counters(device, 1)
    assert tk.split_counters(device, first.numel()) is first
    bigger = tk.split_counters(device, first.numel() + 1)
    assert bigger.numel() > first.numel() and int(bigger.abs().sum()) == 0
    assert tk._SPLIT_COUNTERS[device][0] is first  # a graph captured with it may still use it


@pytest.mark.skipif(INTERPRETED, reason="this is the parent run")
def test_in_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout, res.stdout[-2000:]
