"""Fused kernels (engine/kernels) against their torch fallbacks and the model layers.

The fallback tests run on the CPU (CI); the Triton ones need a GPU (``gpu`` marker).
Outputs are poisoned with NaN where the kernel writes into given memory.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import torch_ops
from engine.models.layers import RMSNorm, silu_and_mul as layers_silu_and_mul
from engine.models.rotary import RotaryEmbedding


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---- fallbacks == model layers (CPU) --------------------------------------------------------------

@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fallback_matches_layer(with_residual):
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.randn(64).bfloat16().float()
    x, res = torch.randn(5, 64), torch.randn(5, 64)
    expect = norm(x, res if with_residual else None)
    got = torch_ops.rms_norm(x, norm.weight.data, 1e-6, res if with_residual else None)
    for e, g in zip(expect, got):
        torch.testing.assert_close(g, e)


def test_rotary_fallback_matches_layer():
    rope = RotaryEmbedding(32, 100, 10000.0)
    positions = torch.randint(0, 100, (7,))
    q, k = torch.randn(7, 4, 32), torch.randn(7, 2, 32)
    eq, ek = rope(positions, q, k)
    gq, gk = torch_ops.rotary_embedding(positions, q.clone(), k.clone(),
                                        rope.cos_sin_cache(q.device))
    torch.testing.assert_close(gq, eq)
    torch.testing.assert_close(gk, ek)


def test_silu_and_mul_fallback_matches_layer():
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(torch_ops.silu_and_mul(x), layers_silu_and_mul(x))


# ---- Triton == fallbacks (GPU) --------------------------------------------------------------------

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 4096, 5120])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_triton(dtype, hidden, with_residual):
    from engine.kernels import triton_ops
    x = torch.randn(37, hidden, device="cuda").to(dtype)
    res = torch.randn(37, hidden, device="cuda").to(dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    out, new_res = triton_ops.rms_norm(x, w, 1e-5, res)
    ref_out, ref_res = torch_ops.rms_norm(x.float(), w.float(), 1e-5,
                                          res.float() if res is not None else None)
    assert not out.isnan().any()
    assert rel_err(out, ref_out) < TOL[dtype]
    if with_residual:
        assert torch.equal(new_res, (x.float() + res.float()).to(dtype))  # one rounding, as torch
    else:
        assert new_res is x


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rot_dim", [(128, 128), (64, 64), (128, 64)])
@pytest.mark.parametrize("heads", [(32, 8), (12, 4), (8, 8)])
def test_rotary_triton_in_place_on_qkv_views(dtype, head_dim, rot_dim, heads):
    from engine.kernels import triton_ops
    num_q, num_kv = heads
    num_tokens = 53
    rope = RotaryEmbedding(rot_dim, 4096, 500000.0)
    cache = rope.cos_sin_cache(torch.device("cuda"))  # (4096, rot_dim) fp32 [cos | sin]
    positions = torch.randint(0, 4096, (num_tokens,), device="cuda")
    qkv = torch.randn(num_tokens, (num_q + 2 * num_kv) * head_dim, device="cuda").to(dtype)
    q, k, v = qkv.split([num_q * head_dim, num_kv * head_dim, num_kv * head_dim], dim=-1)
    q = q.view(num_tokens, num_q, head_dim)  # strided views of the fused projection
    k = k.view(num_tokens, num_kv, head_dim)
    v_before = v.clone()
    ref_q, ref_k = torch_ops.rotary_embedding(positions, q.float().clone(), k.float().clone(), cache)
    out_q, out_k = triton_ops.rotary_embedding(positions, q, k, cache)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert rel_err(q, ref_q) < TOL[dtype] and rel_err(k, ref_k) < TOL[dtype]
    assert torch.equal(v, v_before)  # neighbours untouched


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 128), (37, 28672), (4, 3, 2 * 1000)])
def test_silu_and_mul_triton(dtype, shape):
    from engine.kernels import triton_ops
    x = torch.randn(*shape, device="cuda").to(dtype)
    out = triton_ops.silu_and_mul(x)
    ref = torch_ops.silu_and_mul(x.float())
    assert out.shape == ref.shape and not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.gpu
def test_dispatch_picks_triton_on_cuda_and_fallback_on_cpu():
    import engine.kernels as kernels
    x = torch.randn(4, 64)
    w = torch.ones(64)
    cpu_out, _ = kernels.rms_norm(x, w, 1e-6)
    gpu_out, _ = kernels.rms_norm(x.cuda(), w.cuda(), 1e-6)
    assert rel_err(gpu_out.cpu(), cpu_out) < 1e-5


GEMV_SHAPES = [(1, 4096, 4096), (2, 6144, 4096), (4, 4096, 14336), (3, 1000, 2000)]
ROW_SHAPES = [(1, 4096, 4096), (1, 1000, 2000)]  # gemv_row takes one row; the second divides no block


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel,m,n,k", [(kern, *shape) for kern in ("gemv", "split_k") for shape in GEMV_SHAPES]
                         + [("row", *shape) for shape in ROW_SHAPES])
def test_small_batch_gemv_matches_cublas(dtype, kernel, m, n, k):
    from engine.kernels.gemv import _KERNELS
    torch.manual_seed(0)
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    w = torch.randn(n, k, dtype=dtype, device="cuda") / k ** 0.5
    ref = torch.nn.functional.linear(x.float(), w.float())
    got = _KERNELS[kernel](x, w).float()
    assert got.shape == (m, n)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(_KERNELS[kernel](x, w).float(), got, rtol=0, atol=0)  # tuned: same result


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 2000), (28672, 4096)])
def test_dependent_launches_are_bit_identical(monkeypatch, n, k):
    """KVMESH_PDL (all kernels by default): norm -> GEMV -> SiLU-and-mul -> GEMV -> norm, each a
    programmatic dependent launch reading the one before, eager and replayed in a CUDA graph
    with new inputs, gives exactly what plain launches give (each reads its input only after
    the kernel before it ended)."""
    from engine.kernels import gemv as g
    from engine.kernels import pdl, triton_ops
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper or later")
    torch.manual_seed(0)
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    norm_w = torch.ones(k, dtype=torch.bfloat16, device="cuda")
    w1 = torch.randn(2 * n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5
    w2 = torch.randn(k, n, dtype=torch.bfloat16, device="cuda") / n ** 0.5

    def chain(inp):
        h, _ = triton_ops.rms_norm(inp, norm_w, 1e-5)
        y = g.gemv_row(triton_ops.silu_and_mul(g.gemv_row(h, w1)), w2)
        return triton_ops.rms_norm(y, norm_w, 1e-5, residual=inp)

    def plain(inp):
        monkeypatch.setattr(pdl, "MODE", pdl.PDLMode.OFF)
        try:
            return chain(inp)
        finally:
            monkeypatch.setattr(pdl, "MODE", pdl.PDLMode.ALL)

    monkeypatch.setattr(pdl, "MODE", pdl.PDLMode.ALL)
    expected = plain(x)
    got = chain(x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    static_in = x.clone()
    chain(static_in)  # compiled and tuned outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = chain(static_in)
    for seed in range(3):
        fresh = torch.randn(1, k, dtype=torch.bfloat16, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        static_in.copy_(fresh)
        graph.replay()
        expected = plain(fresh)
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(static_out, expected)), seed


@pytest.mark.gpu
def test_decode_attention_as_dependent_launches_is_bit_identical(monkeypatch):
    """Rotary + KV store, split decode attention and its reduce as dependent launches (each
    reading what the one before wrote) match plain launches bit for bit, in a CUDA graph too."""
    from engine.attention import cache_store as cs
    from engine.attention import triton_kernels as tk
    from engine.kernels import pdl
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper or later")
    torch.manual_seed(0)
    hq, hkv, d, bs, num_blocks, ctx = 16, 4, 128, 16, 64, 700
    kv = torch.randn(2, num_blocks, bs, hkv, d, dtype=torch.bfloat16, device="cuda")
    table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)[:-(-(ctx + 1) // bs)][None]
    seq_lens = torch.tensor([ctx + 1], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    pos = torch.tensor([ctx], dtype=torch.long, device="cuda")
    slot = (table[0, ctx // bs].long() * bs + ctx % bs).view(1)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = torch.arange(4096, device="cuda").float()[:, None] * inv[None]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # (max_pos, d)
    qkv = torch.randn(1, (hq + 2 * hkv) * d, dtype=torch.bfloat16, device="cuda")

    def step(src, cache):
        q, k, v = src.clone().split([hq * d, hkv * d, hkv * d], dim=-1)
        q = q.view(1, hq, d)
        cs.rotary_store_kv(pos, q, k.view(1, hkv, d), v.view(1, hkv, d), cos_sin, cache, slot)
        out = torch.empty_like(q)
        tk.paged_decode(q, cache, table, seq_lens, qsl, 1, d ** -0.5, out, num_splits=8, min_split_len=64)
        return out

    monkeypatch.setattr(pdl, "MODE", pdl.PDLMode.OFF)
    cache_plain = kv.clone()
    expected = step(qkv, cache_plain)
    monkeypatch.setattr(pdl, "MODE", pdl.PDLMode.ALL)
    cache = kv.clone()
    assert torch.equal(step(qkv, cache), expected) and torch.equal(cache, cache_plain)
    static_in, static_cache = qkv.clone(), kv.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_in, static_cache)
    for seed in range(3):
        fresh = torch.randn(qkv.shape, dtype=torch.bfloat16, device="cuda",
                            generator=torch.Generator("cuda").manual_seed(seed))
        static_in.copy_(fresh)
        graph.replay()
        monkeypatch.setattr(pdl, "MODE", pdl.PDLMode.OFF)
        ref_cache = kv.clone()
        expected = step(fresh, ref_cache)
        monkeypatch.setattr(pdl, "MODE", pdl.PDLMode.ALL)
        torch.cuda.synchronize()
        assert torch.equal(static_out, expected) and torch.equal(static_cache[:, table[0]], ref_cache[:, table[0]]), seed


@pytest.mark.gpu
def test_gemv_tune_picks_per_shape_and_linear_follows_it(monkeypatch):
    from engine.kernels import gemv, gemv_tune
    monkeypatch.setattr(gemv, "_USE_GEMV", {})  # tuned here even if an earlier test met the shape
    monkeypatch.setattr(gemv, "_ROW_CONFIG", {})
    from engine.models.layers import RowParallelLinear
    layer = RowParallelLinear(4096, 4096).to(device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.weight, std=0.02)
    report = gemv_tune.tune(layer)
    entry = report["4096x4096"]  # measured once: microseconds per kernel, and the one used
    assert entry["cublas"] > 0 and entry["use"] in ("cublas", "gemv", "split_k", "row"), entry
    assert entry["use_few_rows"] in ("cublas", "gemv", "split_k"), entry  # "row" takes one row only
    for use in (entry["use"], entry["use_few_rows"]):
        assert use == "cublas" or entry[use] < 0.97 * entry["cublas"], entry
    # the one-row kernel's tile: every listed config timed in graphs, the fastest kept where
    # gemv_row (and the pushing GEMV) read it
    sweep = entry["row_configs"]
    assert len(sweep) == len(gemv._gemv_row_kernel.configs) and all(us > 0 for us in sweep.values()), entry
    assert sweep[entry["row_config"]] == min(sweep.values()), entry
    chosen = gemv._tuned_config(gemv._gemv_row_kernel, 4096, 4096, torch.bfloat16)
    assert gemv_tune._config_name(chosen) == entry["row_config"]
    for rows in (1, 3):
        x = torch.randn(rows, 4096, dtype=torch.bfloat16, device="cuda")
        torch.testing.assert_close(layer(x).float(), (x.float() @ layer.weight.float().T), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (4, 151936), (16, 32000), (20, 128256)])
def test_greedy_argmax_triton_is_argmax_ties_included(dtype, rows, vocab):
    from engine.kernels.greedy import greedy_argmax
    logits = torch.randn(rows, vocab, device="cuda").to(dtype)
    logits[0, [3, 5000, vocab - 1]] = logits.max() + 1  # a tie: the first index wins
    assert torch.equal(greedy_argmax(logits), logits.argmax(dim=-1))
    assert greedy_argmax(logits)[0] == 3


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_greedy_table_on_the_gpu_gives_the_argmax_of_the_whole_row(world):
    """engine/kernels/greedy.py: the TP greedy path on CUDA (chunk + table launches, summed, the pick
    launch) against argmax over the whole row, a tie across shards going to the lowest id; each
    shard's table equals the torch path's (the same logits on the CPU)."""
    from engine.kernels.greedy import pick_greedy, shard_greedy_table
    vocab = 128256
    shard = vocab // world
    logits = torch.randn(2, vocab, device="cuda").to(torch.bfloat16)
    logits[0, [7, vocab - 3]] = 40.0  # the first and last shard tie: id 7 wins
    tables = []
    for rank in range(world):
        local = logits[:, rank * shard:(rank + 1) * shard]
        tables.append(shard_greedy_table(local, rank, world, rank * shard))
        assert torch.equal(tables[-1].cpu(), shard_greedy_table(local.cpu(), rank, world, rank * shard))
    ids = pick_greedy(sum(tables), world)
    assert torch.equal(ids, logits.argmax(dim=-1)) and ids[0] == 7


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_shard_embedding_triton_matches_torch(dtype):
    """One launch for a vocab-parallel rank's part of the lookup, the same bits as the torch
    version (rows of the ids in [start, end), zeros for the others), the hidden size not a
    power of two included."""
    from engine.kernels import torch_ops, triton_ops
    torch.manual_seed(0)
    for rows, hidden, start, end in ((64128, 4096, 64128, 128256), (50, 1000, 0, 50)):
        weight = torch.randn(rows, hidden, dtype=dtype, device="cuda")
        ids = torch.randint(0, 2 * rows, (37,), device="cuda")
        ids[0], ids[1] = start, end - 1  # both ends of the shard
        got = triton_ops.vocab_shard_embedding(ids, weight, start, end)
        ref = torch_ops.vocab_shard_embedding(ids, weight, start, end)
        assert torch.equal(got, ref)  # -0.0 (torch: row * 0) equals 0.0 here
        mine = (ids >= start) & (ids < end)
        assert torch.equal(got[mine], weight[ids[mine] - start]) and not got[~mine].any()
