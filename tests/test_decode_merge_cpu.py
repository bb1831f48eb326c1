"""paged_decode's last-program merge (``semaphores``) in Triton's CPU interpreter.

The decode kernel's split programs each write a partial result; with ``semaphores`` the one that
finishes last merges them, without a second kernel, and sets its counter back to zero. Checked
here against the two-kernel merge and the fp32 reference, over split counts that leave some
splits empty, and on a second call with the same counters (a counter left non-zero would leave
its outputs unwritten: they start as NaN). The parent run starts this file again in a subprocess
with ``TRITON_INTERPRET=1``; the interpreted tests skip otherwise.
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


def _decode(case, num_splits: int, semaphores) -> torch.Tensor:
    from engine.attention import triton_kernels as tk
    out = torch.full_like(case.query, float("nan"))
    m = case.meta
    tk.paged_decode(case.query, case.kv_cache, m.block_tables, m.seq_lens, m.query_start_loc,
                    m.num_reqs, case.scale, out, num_splits, block_n=16, min_split_len=16,
                    semaphores=semaphores)
    return out


@interpreted
@pytest.mark.parametrize("num_splits", [2, 5])
def test_last_program_merge_equals_merge_kernel_and_reference(monkeypatch, num_splits):
    from engine.attention import triton_kernels as tk
    from engine.attention.torch_ref import TorchRefBackend
    from tests.gpu.test_triton_attention import make_case
    # contexts: one tile (1 live split), a split boundary, every split live, more keys than
    # num_splits * min_split_len
    lens = [(0, 1), (15, 1), (16, 1), (40, 1), (150, 1)]
    case = make_case(lens, 8, 2, 32, 16, torch.float32, "cpu", seed=num_splits)
    cache = case.kv_cache.clone()
    ref = TorchRefBackend().forward(case.query.float(), case.key, case.value, cache, case.meta,
                                    case.scale)
    case.kv_cache = cache  # the step's keys stored, as the backend does before it attends
    two_kernels = _decode(case, num_splits, None)

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the merge kernel ran although the last program merges")

    monkeypatch.setattr(tk, "_decode_reduce_kernel", NoLaunch())
    sem = tk.decode_semaphores(torch.device("cpu"), count=16)
    for _ in range(2):  # the second call finds the counters the first left
        merged = _decode(case, num_splits, sem)
        assert not merged.isnan().any(), "a (request, KV head) was never merged"
        assert torch.count_nonzero(sem) == 0, sem
        torch.testing.assert_close(merged, two_kernels, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(merged, ref, rtol=1e-4, atol=1e-4)


@interpreted
def test_too_few_semaphores_fall_back_to_the_merge_kernel():
    from engine.attention import triton_kernels as tk
    from tests.gpu.test_triton_attention import make_case
    case = make_case([(40, 1), (70, 1)], 4, 2, 32, 16, torch.float32, "cpu", seed=3)
    sem = tk.decode_semaphores(torch.device("cpu"), count=3)  # 2 requests x 2 KV heads need 4
    out = _decode(case, 4, sem)
    torch.testing.assert_close(out, _decode(case, 4, None), rtol=0, atol=0)
    assert torch.count_nonzero(sem) == 0


@pytest.mark.skipif(INTERPRETED, reason="this is the parent run")
def test_in_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "3 passed" in res.stdout, res.stdout[-2000:]
