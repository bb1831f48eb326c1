"""The fused RoPE + K/V store (``rotary_store_kv``, ``forward_with_rotary``) on the CPU.

Most tests run the Triton kernels in Triton's CPU interpreter, which must be switched on
before Triton is imported: under plain pytest, ``test_in_triton_interpreter`` reruns
this file in a subprocess with ``TRITON_INTERPRET=1`` (the interpreted tests skip
otherwise). Checked there, bit for bit:

  * the fused kernel against the two-kernel path (rotary kernel, then ``store_kv``) and
    against the fp32 torch reference rounded once (the interpreter computes like torch);
  * the Triton backend fused vs unfused vs the reference backend on paged batches;
  * tiny Llama and Qwen3 (q/k norm before RoPE) models through the Triton backend, fused
    vs unfused, and against the reference backend.

The GPU versions are tests/gpu/test_rope_store.py.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from engine.attention.torch_ref import TorchRefBackend, write_kv
from engine.kernels import torch_ops
from engine.models.rotary import RotaryEmbedding

triton = pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_in_triton_interpreter's subprocess")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _interpreter_scalars():
    if INTERPRETED:
        from tests.gpu.test_triton_attention import patch_interpreter_scalars
        patch_interpreter_scalars()


def qkv_views(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The (T, (Hq + 2 Hkv) * D) output of a fused qkv projection."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)


def split_heads(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Strided (T, H, D) views of q, k, v, as the model's ``QKVParallelLinear.split`` makes."""
    t = qkv.shape[0]
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    return q.view(t, num_q_heads, head_dim), k.view(t, num_kv_heads, head_dim), v.view(t, num_kv_heads, head_dim)


# ---- the kernel ---------------------------------------------------------------------------------

# (dtype, head_dim, (Hq, Hkv), T): the GPU test's matrix, thinned where the interpreter is slow
# (seconds a case at 64 tokens and more).
KERNEL_CASES = [(dtype, head_dim, heads, num_tokens)
                for dtype in (torch.float32, torch.float16, torch.bfloat16) for head_dim in (64, 128)
                for heads in ((32, 8), (8, 8), (4, 1)) for num_tokens in (1, 7, 64)
                if num_tokens < 64 or head_dim == 128]
KERNEL_CASES += [(torch.bfloat16, 128, (32, 8), 300), (torch.float16, 64, (4, 1), 300)]


def _case_id(case) -> str:
    dtype, head_dim, (num_q, num_kv), num_tokens = case
    return f"{str(dtype).split('.')[-1]}-d{head_dim}-q{num_q}kv{num_kv}-T{num_tokens}"


@interpreted
@pytest.mark.parametrize("dtype,head_dim,heads,num_tokens", KERNEL_CASES,
                         ids=[_case_id(c) for c in KERNEL_CASES])
def test_fused_kernel_is_rotary_then_store_bit_for_bit(dtype, head_dim, heads, num_tokens):
    from engine.attention import cache_store as cs
    from engine.kernels import triton_ops
    num_q, num_kv = heads
    block_size, num_blocks = 16, num_tokens // 16 + 3
    rope = RotaryEmbedding(head_dim, 4096, 500000.0)
    cos_sin = rope.cos_sin_cache(torch.device("cpu"))
    gen = torch.Generator().manual_seed(num_tokens)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    qkv = qkv_views(num_tokens, num_q, num_kv, head_dim, dtype, seed=head_dim + num_q)
    cache = torch.randn(2, num_blocks, block_size, num_kv, head_dim, generator=gen).to(dtype)

    two_qkv, two_cache = qkv.clone(), cache.clone()
    q2, k2, v2 = split_heads(two_qkv, num_q, num_kv, head_dim)
    triton_ops.rotary_embedding(positions, q2, k2, cos_sin)
    cs.store_kv(k2, v2, two_cache, slots)

    one_qkv, one_cache = qkv.clone(), cache.clone()
    q1, k1, v1 = split_heads(one_qkv, num_q, num_kv, head_dim)
    cs.rotary_store_kv(positions, q1, k1, v1, cos_sin, one_cache, slots)

    assert torch.equal(q1, q2), "query differs from the rotary kernel's"
    assert torch.equal(one_cache, two_cache), "cache differs from rotary + store_kv"
    q0, k0, v0 = split_heads(qkv, num_q, num_kv, head_dim)
    assert torch.equal(k1, k0) and torch.equal(v1, v0), "key / value inputs must be left as they were"

    # fp32 torch reference, rounded once: the interpreter's numpy fp32 math is the same, but
    # the 3.6 interpreter rounds fp32 -> bf16 toward zero (the GPU to nearest): one ulp apart.
    ref_q, ref_k = torch_ops.rotary_embedding(positions, q0.float(), k0.float(), cos_sin)
    ref_cache = cache.clone()
    write_kv(ref_k.to(dtype), v0, ref_cache, slots)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(q1, ref_q.to(dtype), rtol=ulp, atol=0)
    torch.testing.assert_close(one_cache, ref_cache, rtol=ulp, atol=0)


@interpreted
def test_fused_kernel_into_a_layer_view_of_stacked_caches():
    """The cache of layer l is a view of one (L, 2, ...) allocation (engine.attention.base)."""
    from engine.attention import cache_store as cs
    rope = RotaryEmbedding(64, 256, 10000.0)
    cos_sin = rope.cos_sin_cache(torch.device("cpu"))
    stacked = torch.zeros(3, 2, 4, 16, 2, 64)
    qkv = qkv_views(5, 8, 2, 64, torch.float32, seed=0)
    q, k, v = split_heads(qkv.clone(), 8, 2, 64)
    positions, slots = torch.tensor([0, 3, 9, 200, 255]), torch.tensor([63, 0, 17, 5, 40])
    cs.rotary_store_kv(positions, q, k, v, cos_sin, stacked[1], slots)
    ref = torch.zeros(2, 4, 16, 2, 64)
    _, ref_k = torch_ops.rotary_embedding(positions, q.clone(), k.clone(), cos_sin)
    write_kv(ref_k, v, ref, slots)
    assert torch.equal(stacked[1], ref)
    assert not stacked[0].any() and not stacked[2].any()


@interpreted
def test_fused_kernel_rejects_a_partial_rotary_table():
    from engine.attention import cache_store as cs
    q, k, v = split_heads(qkv_views(2, 4, 2, 64, torch.float32, seed=0), 4, 2, 64)
    half_table = RotaryEmbedding(32, 16, 10000.0).cos_sin_cache(torch.device("cpu"))
    with pytest.raises(ValueError, match="whole heads"):
        cs.rotary_store_kv(torch.zeros(2, dtype=torch.long), q, k, v, half_table,
                           torch.zeros(2, 1, 16, 2, 64), torch.tensor([0, 1]))


class TritonRotary(RotaryEmbedding):
    """RoPE through the Triton rotary kernel on any device (on the CPU: interpreted), as the
    unfused CUDA path runs it; plain ``RotaryEmbedding`` uses torch_ops off CUDA."""

    def forward(self, positions, q, k):
        from engine.kernels import triton_ops
        return triton_ops.rotary_embedding(positions, q, k, self.cos_sin_cache(q.device))


# ---- the backend --------------------------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backend_fused_equals_unfused_and_reference(dtype):
    from engine.attention.triton_backend import TritonAttentionConfig, TritonBackend
    from tests.gpu.test_triton_attention import TOLERANCE, make_case
    rng = random.Random(0)
    fused = TritonBackend(TritonAttentionConfig(fuse_rope_store=True))
    unfused = TritonBackend(TritonAttentionConfig(fuse_rope_store=False))
    assert fused.fuse_rope_store and not unfused.fuse_rope_store
    rope = TritonRotary(64, 1024, 10000.0)  # unfused, the GPU's path: rotary kernel, store_kv
    for lens in ([(rng.randrange(0, 200), 1) for _ in range(4)],  # all decode
                 [(0, 37), (20, 1), (33, 9)]):  # prefill mixed with a decode
        case = make_case(lens, 8, 2, 64, 16, dtype, "cpu", seed=len(lens))
        positions = torch.cat([torch.arange(c, c + q) for c, q in lens])
        outs, caches = [], []
        for backend in (fused, unfused, TorchRefBackend()):
            q, k, v = case.query.clone(), case.key.clone(), case.value.clone()
            cache = case.kv_cache.clone()
            outs.append(backend.forward_with_rotary(rope, positions, q, k, v, cache, case.meta,
                                                    case.scale))
            caches.append(cache)
        assert torch.equal(outs[0], outs[1]) and torch.equal(caches[0], caches[1])
        assert (outs[0].float() - outs[2].float()).norm() / outs[2].float().norm() < TOLERANCE[dtype]
        assert torch.equal(caches[0], caches[2])  # fp32 math rounded once, as the reference


class PartialRotary:
    """Rotates the first ``rot_dim`` dims of each head (as torch_ops does): its table is narrower
    than a head, so it cannot be fused."""

    def __init__(self, rot_dim: int) -> None:
        self.table = RotaryEmbedding(rot_dim, 64, 10000.0).cos_sin_cache(torch.device("cpu"))
        self.num_calls = 0

    def cos_sin_cache(self, device: torch.device) -> torch.Tensor:
        return self.table

    def __call__(self, positions, q, k):
        self.num_calls += 1
        return torch_ops.rotary_embedding(positions, q.clone(), k.clone(), self.table)


@interpreted
def test_triton_backend_runs_unfused_without_a_whole_head_table():
    """A rotary with no cos_sin_cache, or a partial one, is called as is."""
    from engine.attention.triton_backend import TritonBackend
    from tests.gpu.test_triton_attention import make_case
    case = make_case([(3, 2), (0, 1)], 4, 2, 32, 16, torch.float32, "cpu", seed=1)
    positions = torch.tensor([3, 4, 0])
    plain_calls = []

    def plain_rotary(pos, q, k):  # not the standard kind: no table to fuse with
        plain_calls.append(pos)
        return q * 2, k * 2

    partial = PartialRotary(16)
    for rotary, num_calls in ((plain_rotary, lambda: len(plain_calls)),
                              (partial, lambda: partial.num_calls)):
        cache, ref_cache = case.kv_cache.clone(), case.kv_cache.clone()
        out = TritonBackend().forward_with_rotary(rotary, positions, case.query.clone(),
                                                  case.key.clone(), case.value.clone(), cache,
                                                  case.meta, case.scale)
        assert num_calls() == 1
        q, k = rotary(positions, case.query.clone(), case.key.clone())
        ref = TorchRefBackend().forward(q, k, case.value, ref_cache, case.meta, case.scale)
        assert torch.equal(cache, ref_cache)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


# ---- models -------------------------------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_model_fused_equals_unfused(arch, tmp_path):
    """Prefill in chunks, then greedy decode steps, through the Triton backend either way."""
    from engine.attention.triton_backend import TritonAttentionConfig, TritonBackend
    from tests.hf_checkpoints import ARCHITECTURES, make_tiny_checkpoint
    from tests.test_models import PagedKV, make_prompts, ours

    path = make_tiny_checkpoint(arch, tmp_path / arch, seed=ARCHITECTURES.index(arch))
    model = ours(path)
    prompts = make_prompts(seed=3, lens=(5, 11, 1))
    results = []
    for backend in (TritonBackend(TritonAttentionConfig(fuse_rope_store=True)),
                    TritonBackend(TritonAttentionConfig(fuse_rope_store=False)), TorchRefBackend()):
        kv = PagedKV(model)
        kv.backend = backend
        logits = [model.compute_logits(kv.step(model, [(0, prompts[0]), (1, prompts[1][:4])])),
                  model.compute_logits(kv.step(model, [(1, prompts[1][4:]), (2, prompts[2])]))]
        tokens = [int(logits[0][4].argmax()), int(logits[1][6].argmax()), int(logits[1][7].argmax())]
        generated = [list(tokens)]
        for _ in range(3):
            hidden = kv.step(model, [(i, [t]) for i, t in enumerate(tokens)])
            step_logits = model.compute_logits(hidden)
            logits.append(step_logits)
            tokens = step_logits.argmax(-1).tolist()
            generated.append(tokens)
        results.append((logits, generated, torch.stack(list(kv.kv_caches))))
    (fused_logits, fused_tokens, fused_cache), (plain_logits, plain_tokens, plain_cache), ref = results
    assert fused_tokens == plain_tokens == ref[1]
    assert all(torch.equal(a, b) for a, b in zip(fused_logits, plain_logits))
    assert torch.equal(fused_cache, plain_cache)
    for a, b in zip(fused_logits, ref[0]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# ---- without the interpreter --------------------------------------------------------------------

def test_default_forward_with_rotary_is_rotary_then_forward():
    """Backends that don't override it (the reference) behave exactly as before."""
    from tests.gpu.test_triton_attention import make_case
    case = make_case([(5, 3), (0, 1)], 4, 2, 32, 16, torch.float32, "cpu", seed=2)
    rope = RotaryEmbedding(32, 64, 10000.0)
    positions = torch.tensor([5, 6, 7, 0])
    cache, ref_cache = case.kv_cache.clone(), case.kv_cache.clone()
    out = TorchRefBackend().forward_with_rotary(rope, positions, case.query, case.key, case.value,
                                                cache, case.meta, case.scale)
    q, k = rope(positions, case.query, case.key)
    ref = TorchRefBackend().forward(q, k, case.value, ref_cache, case.meta, case.scale)
    assert torch.equal(out, ref) and torch.equal(cache, ref_cache)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter has no config switch to check")
def test_env_flag_turns_the_fusion_off(monkeypatch):
    from engine.attention.triton_backend import (DISABLE_FUSED_ROPE_STORE_ENV, TritonAttentionConfig,
                                                 TritonBackend)
    monkeypatch.delenv(DISABLE_FUSED_ROPE_STORE_ENV, raising=False)
    assert TritonBackend().fuse_rope_store
    assert not TritonBackend(TritonAttentionConfig(fuse_rope_store=False)).fuse_rope_store
    monkeypatch.setenv(DISABLE_FUSED_ROPE_STORE_ENV, "1")
    assert not TritonBackend().fuse_rope_store
    monkeypatch.setenv(DISABLE_FUSED_ROPE_STORE_ENV, "0")
    assert TritonBackend().fuse_rope_store


@pytest.mark.skipif(INTERPRETED, reason="compiles, not interprets")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_kernel_compiles_for_sm90(dtype):
    """Ahead of time for an H100/H200 (no GPU needed): 8B shapes, no spills."""
    from engine.attention import cache_store as cs
    from tests.gpu.aot_compile import C, compile_kernel, resource_usage
    try:
        compiled = compile_kernel(cs._rotary_store_kv_kernel, dict(
            pos_ptr=torch.int64, query_ptr=dtype, key_ptr=dtype, value_ptr=dtype,
            cos_sin_ptr=torch.float32, cache_ptr=dtype, slot_ptr=torch.int64,
            stride_qt=6144, stride_qh=128, stride_kt=6144, stride_kh=128, stride_vt=6144,
            stride_vh=128, stride_cs=128, stride_cache_kv=1 << 33, stride_cache_slot=1024,
            stride_cache_head=128, num_q_heads=32, NUM_KV_HEADS=C(8), HEAD_DIM=C(128),
            HALF_PAD=C(64), Q_HEADS_PAD=C(32), KV_HEADS_PAD=C(8), DIM_PAD=C(128)))
    except (ImportError, FileNotFoundError) as e:  # no CUDA toolchain in this Triton (a compile
        pytest.skip(f"cannot compile for sm_90 here: {e}")  # or ptxas error fails the test)
    usage = resource_usage(compiled)
    assert "LOCAL:0" in usage, usage  # no register spills


@pytest.mark.skipif(INTERPRETED, reason="this is the parent run")
def test_in_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout, res.stdout[-2000:]
