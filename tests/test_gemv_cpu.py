"""The batch-1 linear layers' kernel choice (engine/kernels/gemv.py) on the CPU.

``gemv_row`` (one row, multiply-and-sum over K) runs in Triton's CPU interpreter, which must
be switched on before Triton is imported: ``test_in_triton_interpreter`` reruns this file in
a subprocess with ``TRITON_INTERPRET=1`` (the interpreted tests skip otherwise). The
interpreter cannot autotune (no GPU to time on), so every config the autotuner may pick is
launched directly, on shapes that do and do not divide the blocks.

The dispatch tests need no Triton: ``linear`` must send one row to the one-row kernel, 2..4
rows to the few-rows kernel, and anything the tuner left to cuBLAS to ``F.linear``. The GPU
versions (timing, cuBLAS comparison) are in tests/gpu/test_kernels.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import gemv as g, gemv_tune

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_in_triton_interpreter's subprocess")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the kernel, interpreted ---------------------------------------------------------------------
@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(64, 2048), (30, 300), (3, 4096), (48, 7168)])
def test_every_row_config_matches_fp32(dtype, n, k):
    import triton

    from tests.gpu.test_triton_attention import patch_interpreter_scalars
    patch_interpreter_scalars()
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    ref = x.float() @ w.float().T  # (1, N)
    kernel = g._gemv_row_kernel
    for config in kernel.configs:
        out = torch.full((1, n), float("nan"), dtype=dtype)
        kernel.fn[(triton.cdiv(n, config.kwargs["BLOCK_N"]),)](x, w, out, n, k, w.stride(0), **config.kwargs)
        # fp32 accumulation, rounded once to the output dtype: within that rounding of fp32
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2, msg=f"config {config}")


@pytest.fixture
def as_dependent(monkeypatch):
    """PDL=True in the interpreter, which has no griddepcontrol: the waits become no-ops (one
    program at a time, nothing runs before it), so the preloaded path's arithmetic is what
    is checked. Yields a setter for KVMESH_GEMV_PRELOAD's bytes."""
    import triton.language as tl
    monkeypatch.setattr(tl.extra.cuda, "gdc_wait", lambda *a, **k: None)
    monkeypatch.setattr(tl.extra.cuda, "gdc_launch_dependents", lambda *a, **k: None)
    return lambda nbytes: monkeypatch.setattr(g, "PRELOAD_BYTES", nbytes)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(64, 4096), (30, 300), (48, 7168)])
@pytest.mark.parametrize("preload", [0, 65536])
def test_dependent_row_configs_match_fp32_whatever_they_preload(as_dependent, dtype, n, k, preload):
    """PDL=True: each program loads PRE_K columns before it waits (one tile, or as many as
    ``preload`` bytes allow: up to all of K = 4096, 4 of 7 tiles of K = 7168, a padded tile
    of K = 300), then goes on over the rest; the sums still match fp32."""
    import triton

    from tests.gpu.test_triton_attention import patch_interpreter_scalars
    patch_interpreter_scalars()
    as_dependent(preload)
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    ref = x.float() @ w.float().T  # (1, N)
    for config in g._gemv_row_kernel.configs:
        out = torch.full((1, n), float("nan"), dtype=dtype)
        g._gemv_row_kernel.fn[(triton.cdiv(n, config.kwargs["BLOCK_N"]),)](
            x, w, out, n, k, w.stride(0), **config.kwargs, PDL=True)
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2, msg=f"config {config}")


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,block_n", [(64, 2048, 4), (48, 300, 8), (20, 4096, 16), (36, 100, 2)])
@pytest.mark.parametrize("rank,world,round_word", [(0, 2, 6), (1, 2, 9), (2, 4, 0xFFFFFFFF)])
@pytest.mark.parametrize("early_round", [True, False])  # KVMESH_PUSH_EARLY_ROUND: when the reads go
def test_row_push_sends_ll_lines_with_the_next_round(as_dependent, dtype, n, k, block_n, rank, world,
                                                     round_word, early_round):
    """The pushing GEMV's outputs equal the plain one's, and every peer's receive area holds
    them as the LL kernel reads them: 16-byte lines {values 0-1, R, values 2-3, R} in slot
    (parity, rank), with R = round word + 1 (wrapping at 2**32); no other word is touched."""
    from tests.gpu.test_triton_attention import patch_interpreter_scalars
    patch_interpreter_scalars()
    gen = torch.Generator().manual_seed(n + k + rank)
    x = torch.randn(1, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    slot_words = 2 * 64  # max_lines = 64: room for 256 values a row
    areas = [torch.full((2 * world * slot_words,), -1, dtype=torch.int64) for _ in range(world)]
    round_cell = torch.tensor([round_word | (5 << 32)], dtype=torch.int64)  # high half: other data
    table = torch.zeros(world + 1, dtype=torch.int64)
    for q, area in enumerate(areas):
        table[q] = (area.data_ptr() - table.data_ptr()) // 8
    table[world] = (round_cell.data_ptr() - table.data_ptr()) // 8
    config = {"BLOCK_N": block_n, "BLOCK_K": 256}
    plain = torch.empty(1, n, dtype=dtype)
    g._gemv_row_kernel.fn[(-(-n // block_n),)](x, w, plain, n, k, w.stride(0), **config)
    out = torch.empty(1, n, dtype=dtype)
    g._gemv_row_push_kernel[(-(-n // block_n),)](x, w, out, n, k, w.stride(0), table, rank, world,
                                                  slot_words, **config, EARLY_ROUND=early_round)
    assert torch.equal(out, plain)
    # launched as dependents that preload all they may: still equal (one PRE_K for both)
    as_dependent(65536)
    g._gemv_row_kernel.fn[(-(-n // block_n),)](x, w, plain, n, k, w.stride(0), **config, PDL=True)
    g._gemv_row_push_kernel[(-(-n // block_n),)](x, w, out, n, k, w.stride(0), table, rank, world,
                                                  slot_words, **config, PDL=True, EARLY_ROUND=early_round)
    assert torch.equal(out, plain)
    round_ = (round_word + 1) & 0xFFFFFFFF
    halves = out.view(torch.int16).view(-1, 2).to(torch.int64) & 0xFFFF  # (N/2, 2) bit patterns
    data = halves[:, 0] | (halves[:, 1] << 16)  # what a line's data word holds, in order
    expected_words = (data | (round_ << 32)).view(torch.int64)
    for q, area in enumerate(areas):
        slots = area.view(2, world, slot_words)
        if q == rank:
            assert bool((area == -1).all()), "a rank's own area is never written"
            continue
        got = slots[round_ & 1, rank]
        assert torch.equal(got[:n // 2], expected_words)
        assert bool((got[n // 2:] == -1).all()) and bool((slots[1 - (round_ & 1)] == -1).all())
        assert bool((slots[round_ & 1, torch.arange(world) != rank] == -1).all())


# ---- dispatch ------------------------------------------------------------------------------------
@pytest.fixture
def recorded(monkeypatch):
    """Each Triton kernel replaced by F.linear that records its name and the row count."""
    calls: list[tuple[str, int]] = []

    def recorder(name):
        def run(x, w):
            calls.append((name, x.shape[0]))
            return F.linear(x, w)
        return run

    monkeypatch.setattr(g, "_KERNELS", {name: recorder(name) for name in g._KERNELS})
    monkeypatch.setattr(g, "_USE_GEMV", {})
    return calls


def test_linear_sends_one_row_and_few_rows_to_their_kernels(recorded):
    w = torch.randn(8, 16)
    g._USE_GEMV[(8, 16, w.dtype)] = ("row", "split_k")
    bias = torch.randn(8)
    for rows in (1, 2, 4, 5):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(g.linear(x, w, bias), F.linear(x, w, bias))
    assert recorded == [("row", 1), ("split_k", 2), ("split_k", 4)]  # 5 rows: cuBLAS


def test_linear_uses_cublas_where_the_tuner_chose_it(recorded):
    w = torch.randn(8, 16)
    g._USE_GEMV[(8, 16, w.dtype)] = ("row", None)  # no Triton kernel beat cuBLAS at 2..4 rows
    g.linear(torch.randn(3, 16), w)
    g.linear(torch.randn(1, 32), torch.randn(8, 32))  # a shape never tuned
    assert recorded == []
    g.linear(torch.randn(1, 16), w)
    assert recorded == [("row", 1)]


def test_fastest_needs_a_3_percent_win_and_few_rows_never_gets_the_one_row_kernel():
    assert gemv_tune._fastest({"cublas": 10.0, "gemv": 9.6, "row": 8.0}) == "row"
    assert gemv_tune._fastest({"cublas": 10.0, "gemv": 9.8}) is None  # 2% is within timing noise
    assert gemv_tune._fastest({"gemv": 1.0}) is None  # cuBLAS failed to time: never guess
    times = {"cublas": 10.0, "gemv": 9.6, "split_k": 9.0, "row": 8.0}
    few = gemv_tune._fastest({k: v for k, v in times.items() if k not in g._ONE_ROW_ONLY})
    assert few == "split_k"


def test_gemv_row_refuses_more_than_one_row():
    if g.triton is None:
        pytest.skip("triton is not installed")
    with pytest.raises(ValueError, match="one row"):
        g.gemv_row(torch.randn(2, 16), torch.randn(8, 16))


def test_pushing_gemv_declines_shapes_not_tuned_to_the_row_kernel(monkeypatch):
    """The pushing GEMV is never autotuned (each trial would push): without ``tune`` having
    chosen ``gemv_row`` for the shape, and its config in the autotuner's cache, it declines."""
    if g.triton is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(g, "_USE_GEMV", {})
    monkeypatch.setattr(g, "_ROW_CONFIG", {})
    x, w = torch.randn(1, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
    table = torch.zeros(3, dtype=torch.int64)
    assert g.gemv_row_push(x, w, table, 0, 2, 64) is None  # not tuned
    g._USE_GEMV[(8, 16, torch.bfloat16)] = ("row", None)
    assert g.gemv_row_push(x, w, table, 0, 2, 64) is None  # chosen, but no tuned config yet
    assert g._ROW_CONFIG == {}  # and nothing cached: asked again once tuned
    g._USE_GEMV[(8, 16, torch.bfloat16)] = (None, None)
    assert g.gemv_row_push(x.float(), w.float(), table, 0, 2, 64) is None  # 4-byte dtype


def test_tile_sweep_leaves_the_fastest_tile_where_gemv_row_and_the_push_read_it(monkeypatch):
    """``_sweep_row_configs`` times each listed tile (here: made-up times) and writes the fastest
    into the autotuner's cache entry for the shape, where ``_row_config`` (the pushing GEMV's
    config, so the same sums as ``gemv_row``) finds it; a cached lookup from before is dropped."""
    if g.triton is None:
        pytest.skip("triton is not installed")
    kernel = g._gemv_row_kernel
    configs = kernel.configs
    dtype = torch.bfloat16
    key = (8, 16, str(dtype), str(dtype), str(dtype))  # (N, K, x, w, out dtypes): the autotuner's
    monkeypatch.setattr(kernel, "cache", {key: configs[0]})
    monkeypatch.setattr(g, "_USE_GEMV", {(8, 16, dtype): ("row", None)})
    monkeypatch.setattr(g, "_ROW_CONFIG", {})
    assert g._row_config(8, 16, dtype) is configs[0]  # the autotuner's pick, now cached here
    fastest = configs[3]
    fake_us = {gemv_tune._config_name(c): 5.0 + i for i, c in enumerate(configs)}
    fake_us[gemv_tune._config_name(fastest)] = 4.0
    timed = {}

    def fake_time(fns, weight, calls):
        timed.update(fns)
        return {name: us * 1e-6 for name, us in fake_us.items()}
    monkeypatch.setattr(gemv_tune, "_time_in_graphs", fake_time)
    w = torch.zeros(8, 16, dtype=dtype)
    report = gemv_tune._sweep_row_configs(torch.zeros(1, 16, dtype=dtype), [w], calls=4)
    assert set(timed) == set(fake_us) and len(timed) == len(configs)  # every listed tile timed
    assert report == {name: round(us, 2) for name, us in fake_us.items()}
    assert kernel.cache[key] is fastest
    assert g._row_config(8, 16, dtype) is fastest  # not the lookup cached before the sweep
    with pytest.raises(RuntimeError, match="never autotuned"):
        gemv_tune._set_row_config(8, 32, dtype, fastest)


@pytest.mark.parametrize("block_n,block_k,k,nbytes,pre_k", [
    (4, 1024, 4096, 0, 1024),  # default: one tile
    (4, 1024, 4096, 16384, 2048),  # two 8 KiB tiles
    (4, 1024, 4096, 24576, 2048),  # a power of two of tiles: not three
    (4, 1024, 4096, 1 << 20, 4096),  # never past K
    (4, 2048, 7168, 1 << 20, 4096),  # 2 of 3.5 tiles (a power of two)
    (2, 1024, 300, 1 << 20, 1024),  # K under one tile: the masked tile
])
def test_preload_is_a_power_of_two_of_tiles_within_the_budget_and_k(monkeypatch, block_n, block_k, k,
                                                                      nbytes, pre_k):
    monkeypatch.setattr(g, "PRELOAD_BYTES", nbytes)
    w = torch.empty(0, dtype=torch.bfloat16)
    assert g._pre_k({"BLOCK_N": block_n, "BLOCK_K": block_k, "K": k, "w_ptr": w}) == pre_k


def test_in_triton_interpreter():
    if INTERPRETED:
        pytest.skip("already the interpreter's run")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-k", "row_config or row_push", os.path.abspath(__file__)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "68 passed" in res.stdout, res.stdout[-2000:]  # 44 before the early_round cases
