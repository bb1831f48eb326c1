"""Fused RoPE + K/V store (``rotary_store_kv``) against the two-kernel path it replaces, on a GPU.

The two-kernel path is the Triton rotary kernel (in place on q and k) then ``store_kv``;
the fused kernel must leave q and the cache bit for bit the same, on strided q/k/v views of
one qkv output as the model makes them. Then the backend (eager and in a CUDA graph) and
whole tiny models, greedy tokens with ``KVMESH_DISABLE_FUSED_ROPE_STORE`` unset and set.
The CPU versions (Triton's interpreter) are tests/test_rope_store_cpu.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.kernels import torch_ops
from engine.models.rotary import RotaryEmbedding
from tests.engine_helpers import assert_no_leaks, checkpoint_with_tokenizer

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ROUNDING = {torch.bfloat16: (2 ** -8, 1e-3), torch.float16: (2 ** -11, 1e-4),  # (rtol, atol)
            torch.float32: (1e-6, 1e-6)}


def qkv_views(qkv: torch.Tensor, num_q: int, num_kv: int, head_dim: int):
    """Strided (T, H, D) views of q, k, v in a (T, (Hq + 2 Hkv) D) qkv output."""
    t = qkv.shape[0]
    q, k, v = qkv.split([num_q * head_dim, num_kv * head_dim, num_kv * head_dim], dim=-1)
    return q.view(t, num_q, head_dim), k.view(t, num_kv, head_dim), v.view(t, num_kv, head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(32, 8), (8, 8), (4, 1), (12, 4)])
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 300])
def test_fused_equals_rotary_then_store(dtype, head_dim, heads, num_tokens):
    from engine.attention import cache_store as cs
    from engine.kernels import triton_ops
    num_q, num_kv = heads
    block_size = 16
    num_blocks = num_tokens // block_size + 5
    cos_sin = RotaryEmbedding(head_dim, 8192, 500000.0).cos_sin_cache(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(num_tokens * 1000 + head_dim + num_q)
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda", generator=gen)
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=gen)[:num_tokens]
    qkv = torch.randn(num_tokens, (num_q + 2 * num_kv) * head_dim, device="cuda", generator=gen).to(dtype)
    cache = torch.randn(2, num_blocks, block_size, num_kv, head_dim, device="cuda", generator=gen).to(dtype)

    two_qkv, two_cache = qkv.clone(), cache.clone()
    q2, k2, v2 = qkv_views(two_qkv, num_q, num_kv, head_dim)
    triton_ops.rotary_embedding(positions, q2, k2, cos_sin)
    cs.store_kv(k2, v2, two_cache, slots)

    one_qkv, one_cache = qkv.clone(), cache.clone()
    q1, k1, v1 = qkv_views(one_qkv, num_q, num_kv, head_dim)
    cs.rotary_store_kv(positions, q1, k1, v1, cos_sin, one_cache, slots)
    torch.cuda.synchronize()

    assert torch.equal(q1, q2), f"query: {(q1.float() - q2.float()).abs().max().item()} max diff"
    assert torch.equal(one_cache, two_cache), "cache differs from rotary + store_kv"
    _, k0, v0 = qkv_views(qkv, num_q, num_kv, head_dim)
    assert torch.equal(k1, k0) and torch.equal(v1, v0), "key / value inputs must be left as they were"
    # and it is RoPE: the fp32 reference, rounded once (FMA may move the last bit)
    q0 = qkv_views(qkv, num_q, num_kv, head_dim)[0]
    ref_q, _ = torch_ops.rotary_embedding(positions, q0.float(), k0.float(), cos_sin)
    rtol, atol = ROUNDING[dtype]
    torch.testing.assert_close(q1.float(), ref_q, rtol=rtol, atol=atol)


def test_fused_into_a_layer_of_stacked_caches():
    """A layer's cache is a view of one (L, 2, ...) allocation; only its slots change."""
    from engine.attention import cache_store as cs
    from engine.kernels import triton_ops
    cos_sin = RotaryEmbedding(128, 4096, 500000.0).cos_sin_cache(torch.device("cuda"))
    stacked = torch.randn(4, 2, 8, 16, 8, 128, device="cuda").bfloat16()
    before = stacked.clone()
    qkv = torch.randn(9, 48 * 128, device="cuda").bfloat16()
    positions = torch.randint(0, 4096, (9,), device="cuda")
    slots = torch.randperm(128, device="cuda")[:9]
    q, k, v = qkv_views(qkv.clone(), 32, 8, 128)
    cs.rotary_store_kv(positions, q, k, v, cos_sin, stacked[2], slots)
    rq, rk, rv = qkv_views(qkv.clone(), 32, 8, 128)
    ref = before[2].clone()
    triton_ops.rotary_embedding(positions, rq, rk, cos_sin)
    cs.store_kv(rk, rv, ref, slots)
    assert torch.equal(stacked[2], ref) and torch.equal(q, rq)
    for layer in (0, 1, 3):
        assert torch.equal(stacked[layer], before[layer])


def _decode_and_prefill_batches(block_size: int, rng: random.Random) -> list[list[tuple[int, int]]]:
    return [[(rng.randrange(0, 2000), 1) for _ in range(8)],  # all decode
            [(0, 300), (100, 1), (2 * block_size + 3, 40), (rng.randrange(1, 500), 1)]]  # mixed


@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_fused_equals_unfused(dtype):
    """forward_with_rotary: the same output and cache with the fusion on and off."""
    from engine.attention.triton_backend import TritonAttentionConfig, TritonBackend
    from tests.gpu.test_triton_attention import make_case
    fused = TritonBackend(TritonAttentionConfig(fuse_rope_store=True))
    unfused = TritonBackend(TritonAttentionConfig(fuse_rope_store=False))
    assert fused.fuse_rope_store, "KVMESH_DISABLE_FUSED_ROPE_STORE is set"
    rope = RotaryEmbedding(128, 8192, 500000.0)
    rng = random.Random(0)
    for lens in _decode_and_prefill_batches(16, rng):
        case = make_case(lens, 32, 8, 128, 16, dtype, "cuda", seed=rng.randrange(1 << 30))
        positions = torch.cat([torch.arange(c, c + q) for c, q in lens]).cuda()
        results = []
        for backend in (fused, unfused):
            q, k, v = case.query.clone(), case.key.clone(), case.value.clone()
            cache = case.kv_cache.clone()
            out = torch.full_like(q, float("nan"))
            backend.forward_with_rotary(rope, positions, q, k, v, cache, case.meta, case.scale, out=out)
            results.append((out, cache))
        (out_f, cache_f), (out_u, cache_u) = results
        assert not out_f.isnan().any()
        assert torch.equal(cache_f, cache_u) and torch.equal(out_f, out_u)


def test_fused_decode_in_a_cuda_graph():
    """Captured once, replayed with new positions, slots and lengths: as eager and unfused."""
    from engine.attention.triton_backend import TritonAttentionConfig, TritonBackend
    from tests.gpu.test_triton_attention import make_case
    fused = TritonBackend(TritonAttentionConfig(fuse_rope_store=True))
    unfused = TritonBackend(TritonAttentionConfig(fuse_rope_store=False))
    rope = RotaryEmbedding(128, 8192, 500000.0)
    batch, width = 8, 200
    rng = random.Random(1)
    cases = [make_case([(rng.randrange(1, 3000), 1) for _ in range(batch)], 32, 8, 128, 16,
                       torch.bfloat16, "cuda", seed=s) for s in range(3)]
    static = make_case([(width * 16 - 1, 1)] * batch, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=9)
    # Room for every case's blocks and for the static case's own slots (the eager warm-up call
    # writes there): a smaller cache made that call write past its end.
    num_blocks = max(c.kv_cache.shape[1] for c in cases + [static])
    static.kv_cache = torch.zeros(2, num_blocks, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    static.meta.block_tables = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
    positions = torch.zeros(batch, dtype=torch.long, device="cuda")
    query = static.query.clone()
    out = torch.empty_like(static.query)

    def run():
        query.copy_(static.query)  # the fused kernel rotates query in place
        fused.forward_with_rotary(rope, positions, query, static.key, static.value, static.kv_cache,
                                  static.meta, static.scale, out=out)

    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for case in cases:
        for dst, src in ((static.query, case.query), (static.key, case.key),
                         (static.value, case.value), (static.meta.slot_mapping, case.meta.slot_mapping),
                         (static.meta.seq_lens, case.meta.seq_lens),
                         (positions, case.meta.seq_lens.long() - 1)):
            dst.copy_(src)
        static.meta.block_tables.zero_()
        static.meta.block_tables[:, :case.meta.block_tables.shape[1]] = case.meta.block_tables
        static.kv_cache[:, :case.kv_cache.shape[1]] = case.kv_cache
        ref_cache = static.kv_cache.clone()
        ref_out = torch.empty_like(out)
        unfused.forward_with_rotary(rope, positions, case.query.clone(), case.key.clone(),
                                    case.value.clone(), ref_cache, static.meta, static.scale,
                                    out=ref_out)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static.kv_cache, ref_cache) and torch.equal(out, ref_out)


# ---- models ------------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.mark.parametrize("arch,dtype,options", [
    ("llama", "bfloat16", {}),
    ("llama", "float32", {}),
    ("llama", "bfloat16", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=128)),
    ("qwen3", "bfloat16", {}),  # q/k RMSNorm before RoPE
], ids=["llama-bf16", "llama-fp32", "llama-bf16-d128", "qwen3-bf16"])
def test_greedy_tokens_same_with_fusion_on_and_off(arch, dtype, options, tmp_path, monkeypatch):
    """CUDA graphs (decode and mixed) and eager steps, the same tokens either way; the fused
    kernel is launched only with the flag unset."""
    from engine.attention import cache_store as cs
    from engine.attention.triton_backend import DISABLE_FUSED_ROPE_STORE_ENV
    path, vocab = checkpoint_with_tokenizer(arch, tmp_path, **options)
    rng = random.Random(0)
    prompts = [[rng.randrange(5, vocab) for _ in range(n)] for n in (3, 17, 40, 9, 70, 1, 300)]
    launches = []
    real = cs.rotary_store_kv
    monkeypatch.setattr(cs, "rotary_store_kv", lambda *a: launches.append(1) or real(*a))
    tokens = {}
    for disabled in ("0", "1"):
        monkeypatch.setenv(DISABLE_FUSED_ROPE_STORE_ENV, disabled)
        launches.clear()
        llm = LLM(model=path, dtype=dtype, device="cuda", block_size=16, attention_backend="triton",
                  num_blocks=128, max_num_batched_tokens=64)  # chunked prefill mixes with decodes
        tokens[disabled] = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        runner = llm.engine.executor.runner
        assert runner.graph_runner is not None and runner.graph_runner.decode.num_replays > 0
        assert (len(launches) > 0) == (disabled == "0"), len(launches)
        assert_no_leaks(llm)
        del llm
        torch.cuda.empty_cache()
    assert tokens["0"] == tokens["1"]
