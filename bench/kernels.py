"""Kernel benchmarks: paged decode / prefill attention and the fused layer kernels.

    python -m bench.kernels [--out bench/results/kernels_<gpu>.json] [--quick] [--rope-store]

Decode attention at the Llama-3.1-8B shape (32 query heads, 8 KV heads, head_dim
128, bf16, block_size 16) for batch 1/16/64/128 x context 512/2048/8192, against

  * the bytes floor: KV bytes read / measured device copy bandwidth (read + write),
  * torch SDPA on the same K/V gathered into contiguous (B, Hkv, S, D) tensors.

Decode is timed as many forwards back to back inside one CUDA graph (as the
engine's decode step runs), cycling over enough independent input sets that
they don't fit in L2. Also: prefill attention throughput (TFLOP/s of the causal
attention actually computed), the fused RMSNorm / rotary / SiLU-and-mul kernels
against their torch fallbacks, and RoPE + K/V store as two launches vs one at decode
shapes (``--rope-store``: only that). Prints tables and writes JSON with the GPU name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionMetadata
from engine.attention.triton_backend import TritonAttentionConfig, TritonBackend

HQ, HKV, D, BS, DTYPE = 32, 8, 128, 16, torch.bfloat16


def time_graphs(graphs: list, iters: int = 50, repeats: int = 7) -> float:
    """Median seconds per replay, replaying ``graphs`` round-robin (graph = CUDAGraph or callable)."""
    def step(i):
        g = graphs[i % len(graphs)]
        g.replay() if isinstance(g, torch.cuda.CUDAGraph) else g()
    for i in range(3 * len(graphs)):
        step(i)
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            step(i)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(samples)


def time_in_graph(fns: list, reps: int, repeats: int = 5) -> float:
    """Median seconds per call, with ``reps`` calls cycling through ``fns`` in ONE CUDA graph.

    Back-to-back inside a graph, as the engine's decode step runs its layers: the
    host's per-graph launch cost (several us) stays out of small cases, which
    replaying one small graph per call would measure instead. Falls back to eager
    launches if the capture fails.
    """
    for fn in fns:
        fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(reps):
                fns[i % len(fns)]()
        run = graph.replay
    except RuntimeError as e:
        print(f"  (graph capture failed, timing eager launches: {str(e).splitlines()[0][:80]})")
        torch.cuda.synchronize()

        def run():
            for i in range(reps):
                fns[i % len(fns)]()
    run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(samples)


def graph_reps(bytes_per_call: int, num_fns: int) -> int:
    """Calls in one timed graph: ~1 GB of traffic, every input set at least once, <= 256."""
    return max(num_fns, min(256, math.ceil(1e9 / bytes_per_call)))


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_graphs([lambda: dst.copy_(src)], iters=10, repeats=5)
    return 2 * n / t


def num_sets(bytes_per_set: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(64, math.ceil(3 * l2 / bytes_per_set)))


# ---- decode ------------------------------------------------------------------------------------------

def decode_case(batch: int, ctx: int, backend: TritonBackend, check: bool, with_sdpa: bool = True) -> dict:
    blocks_per_req = ctx // BS
    kv_bytes = batch * ctx * HKV * D * 2 * DTYPE.itemsize  # K and V of every context token
    sets = num_sets(kv_bytes)
    num_blocks = sets * batch * blocks_per_req
    cache = torch.randn(2, num_blocks, BS, HKV, D, device="cuda", dtype=DTYPE)
    perm = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(sets, batch, blocks_per_req)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE)
    k_new = torch.randn(batch, HKV, D, device="cuda", dtype=DTYPE)
    v_new = torch.randn_like(k_new)
    pos = ctx - 1  # the new token's position
    out = torch.empty_like(q)
    metas = []
    for s in range(sets):
        tables = perm[s]
        slots = (tables[:, pos // BS].long() * BS + pos % BS)
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
            seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device="cuda"), block_tables=tables,
            max_query_len=1, max_seq_len=ctx, query_start_loc_cpu=list(range(batch + 1)),
            seq_lens_cpu=[ctx] * batch)
        metas.append(meta)
    reps = graph_reps(kv_bytes, sets)
    t_triton = time_in_graph([lambda m=m: backend.forward(q, k_new, v_new, cache, m, D ** -0.5, out=out)
                              for m in metas], reps)
    floor = kv_bytes / BANDWIDTH
    row = dict(batch=batch, ctx=ctx, kv_bytes=kv_bytes, input_sets=sets,
               splits=backend.num_decode_splits(batch, cache), triton_us=t_triton * 1e6,
               floor_us=floor * 1e6, triton_tb_s=kv_bytes / t_triton / 1e12, of_floor=floor / t_triton)
    if not with_sdpa:
        return row

    # SDPA on contiguous copies of the same K/V: (B, Hkv, S, D)
    def gather(s):
        ids = perm[s].long()  # (B, blocks)
        k = cache[0, ids].flatten(1, 2).transpose(1, 2).contiguous()
        v = cache[1, ids].flatten(1, 2).transpose(1, 2).contiguous()
        return k, v
    q4 = q.unsqueeze(2)  # (B, Hq, 1, D)
    sdpa_fns, err = [], None
    for s in range(sets):
        k, v = gather(s)
        sdpa_fns.append(lambda k=k, v=v: F.scaled_dot_product_attention(
            q4, k, v, scale=D ** -0.5, enable_gqa=True))
        if check and s == 0:
            backend.forward(q, k_new, v_new, cache, metas[0], D ** -0.5, out=out)
            ref = F.scaled_dot_product_attention(q4.float(), k.float(), v.float(), scale=D ** -0.5,
                                                 enable_gqa=True).squeeze(2)
            err = ((out.float() - ref).norm() / ref.norm()).item()
        del k, v
    t_sdpa = time_in_graph(sdpa_fns, reps)
    del sdpa_fns
    row.update(sdpa_us=t_sdpa * 1e6, vs_sdpa=t_sdpa / t_triton, rel_err_vs_sdpa=err)
    return row


# ---- prefill ---------------------------------------------------------------------------------------

def prefill_case(lens: list[tuple[int, int]], config: TritonAttentionConfig, with_sdpa: bool) -> dict:
    """lens: (context_len, new_len) per request; context already cached."""
    backend = TritonBackend(config)
    blocks = [-(-(c + n) // BS) for c, n in lens]
    cache = torch.randn(2, sum(blocks), BS, HKV, D, device="cuda", dtype=DTYPE)
    perm = torch.randperm(sum(blocks)).tolist()
    tables, slots, qsl, seq_lens, at = [], [], [0], [], 0
    for (c, n), nb in zip(lens, blocks):
        table = perm[at:at + nb]
        at += nb
        tables.append(table + [0] * (max(blocks) - nb))
        slots += [table[p // BS] * BS + p % BS for p in range(c, c + n)]
        qsl.append(qsl[-1] + n)
        seq_lens.append(c + n)
    T = qsl[-1]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device="cuda"), query_start_loc=torch.tensor(qsl, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=torch.tensor(tables, dtype=torch.int32, device="cuda"),
        max_query_len=max(n for _, n in lens), max_seq_len=max(seq_lens), query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens)
    q = torch.randn(T, HQ, D, device="cuda", dtype=DTYPE)
    k = torch.randn(T, HKV, D, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    t = time_graphs([lambda: backend.forward(q, k, v, cache, meta, D ** -0.5, out=out)], iters=10, repeats=5)
    pairs = sum(sum(c + i + 1 for i in range(n)) for c, n in lens)  # (query, key) pairs computed
    flops = 4 * HQ * D * pairs
    large = (config.prefill_large_min_query_len is not None
             and meta.max_query_len >= config.prefill_large_min_query_len)
    row = dict(lens=lens, triton_ms=t * 1e3, triton_tflops=flops / t / 1e12,
               block_m=config.prefill_large_block_m if large else config.prefill_block_m,
               block_n=config.prefill_block_n,
               num_warps=config.prefill_large_num_warps if large else config.prefill_num_warps,
               num_stages=config.prefill_num_stages)
    if with_sdpa and all(c == 0 for c, _ in lens) and len({n for _, n in lens}) == 1:
        B, L = len(lens), lens[0][1]
        qs = torch.randn(B, HQ, L, D, device="cuda", dtype=DTYPE)
        ks = torch.randn(B, HKV, L, D, device="cuda", dtype=DTYPE)
        vs = torch.randn_like(ks)
        ts = time_graphs([lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)],
                         iters=10, repeats=5)
        row.update(sdpa_ms=ts * 1e3, sdpa_tflops=flops / ts / 1e12)
    return row


# ---- fused layer kernels ---------------------------------------------------------------------------

def fused_cases() -> list[dict]:
    from engine.kernels import torch_ops, triton_ops
    from engine.models.rotary import RotaryEmbedding
    T, H, inter = 4096, 4096, 14336
    x = torch.randn(T, H, device="cuda", dtype=DTYPE)
    res = torch.randn_like(x)
    w = torch.randn(H, device="cuda", dtype=DTYPE)
    gate_up = torch.randn(T, 2 * inter, device="cuda", dtype=DTYPE)
    qkv = torch.randn(T, (HQ + 2 * HKV) * D, device="cuda", dtype=DTYPE)
    q = qkv[:, :HQ * D].view(T, HQ, D)
    k = qkv[:, HQ * D:(HQ + HKV) * D].view(T, HKV, D)
    positions = torch.randint(0, 8192, (T,), device="cuda")
    cos_sin = RotaryEmbedding(D, 8192, 500000.0).cos_sin_cache(torch.device("cuda"))
    e = DTYPE.itemsize
    cases = [("rms_norm+residual", lambda m: m.rms_norm(x, w, 1e-5, res), 4 * T * H * e),
             ("silu_and_mul", lambda m: m.silu_and_mul(gate_up), 3 * T * inter * e),
             ("rotary (q,k in place)", lambda m: m.rotary_embedding(positions, q, k, cos_sin),
              2 * T * (HQ + HKV) * D * e)]
    rows = []
    for name, fn, nbytes in cases:
        t_tr = time_in_graph([lambda: fn(triton_ops)], reps=20)
        t_th = time_in_graph([lambda: fn(torch_ops)], reps=20)
        rows.append(dict(kernel=name, bytes=nbytes, triton_us=t_tr * 1e6, torch_us=t_th * 1e6,
                         floor_us=nbytes / BANDWIDTH * 1e6, of_floor=nbytes / BANDWIDTH / t_tr))
    return rows


def rope_store_cases(batches=(1, 8, 32), ctx: int = 512, num_layers: int = 32) -> list[dict]:
    """RoPE + K/V store at the 8B decode shape, unfused (the rotary kernel, then store_kv) vs
    fused (rotary_store_kv); alone, and as a layer's whole attention (+ paged decode).

    ``num_layers`` layers, each with its own qkv output and cache, back to back in one CUDA
    graph, as a decode step runs them: the gap is mostly the launch the fusion removes.
    """
    from engine.attention import cache_store as cs
    from engine.kernels import triton_ops
    from engine.models.rotary import RotaryEmbedding
    rope = RotaryEmbedding(D, 8192, 500000.0)
    cos_sin = rope.cos_sin_cache(torch.device("cuda"))
    unfused = TritonBackend(TritonAttentionConfig(fuse_rope_store=False))
    fused = TritonBackend(TritonAttentionConfig(fuse_rope_store=True))
    if not fused.fuse_rope_store:
        print("  (KVMESH_DISABLE_FUSED_ROPE_STORE is set: the fused layer column runs unfused)")
    rows = []
    for batch in batches:
        blocks_per_req = ctx // BS
        layers = []
        for _ in range(num_layers):
            qkv = torch.randn(batch, (HQ + 2 * HKV) * D, device="cuda", dtype=DTYPE)
            q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
            cache = torch.randn(2, batch * blocks_per_req, BS, HKV, D, device="cuda", dtype=DTYPE)
            tables = torch.randperm(batch * blocks_per_req, device="cuda").to(torch.int32)
            tables = tables.view(batch, blocks_per_req)
            positions = torch.full((batch,), ctx - 1, device="cuda")
            meta = AttentionMetadata(
                slot_mapping=tables[:, -1].long() * BS + (ctx - 1) % BS,
                query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
                seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device="cuda"),
                block_tables=tables, max_query_len=1, max_seq_len=ctx,
                query_start_loc_cpu=list(range(batch + 1)), seq_lens_cpu=[ctx] * batch)
            out = torch.empty(batch, HQ, D, device="cuda", dtype=DTYPE)
            layers.append((positions, q.view(batch, HQ, D), k.view(batch, HKV, D),
                           v.view(batch, HKV, D), cache, meta, out))

        def two_launches(pos, q, k, v, cache, meta, out):
            triton_ops.rotary_embedding(pos, q, k, cos_sin)
            cs.store_kv(k, v, cache, meta.slot_mapping)

        def one_launch(pos, q, k, v, cache, meta, out):
            cs.rotary_store_kv(pos, q, k, v, cos_sin, cache, meta.slot_mapping)

        def layer(backend):
            return lambda pos, q, k, v, cache, meta, out: backend.forward_with_rotary(
                rope, pos, q, k, v, cache, meta, D ** -0.5, out=out)

        times = {}
        for name, fn in (("unfused", two_launches), ("fused", one_launch),
                         ("layer_unfused", layer(unfused)), ("layer_fused", layer(fused))):
            fns = [lambda a=a, fn=fn: fn(*a) for a in layers]
            times[name] = time_in_graph(fns, reps=4 * num_layers) * 1e6
        rows.append(dict(batch=batch, ctx=ctx, num_layers=num_layers,
                         **{f"{name}_us": t for name, t in times.items()},
                         fused_over_unfused=times["fused"] / times["unfused"],
                         layer_fused_over_unfused=times["layer_fused"] / times["layer_unfused"],
                         step_saving_us=num_layers * (times["layer_unfused"] - times["layer_fused"])))
        del layers
        torch.cuda.empty_cache()
    return rows


def print_rope_store(rows: list[dict]) -> None:
    print(f"\nRoPE + K/V store, 8B decode shape (Hq {HQ}, Hkv {HKV}, D {D}, bf16), us a layer, "
          f"{rows[0]['num_layers']} layers back to back in one CUDA graph")
    print(f"{'batch':>5} {'rot+store':>10} {'fused':>7} {'ratio':>6} {'layer':>8} {'layer fused':>12} "
          f"{'ratio':>6} {'step saves us':>14}")
    for r in rows:
        print(f"{r['batch']:>5} {r['unfused_us']:>10.2f} {r['fused_us']:>7.2f} "
              f"{r['fused_over_unfused']:>6.2f} {r['layer_unfused_us']:>8.2f} "
              f"{r['layer_fused_us']:>12.2f} {r['layer_fused_over_unfused']:>6.2f} "
              f"{r['step_saving_us']:>14.1f}", flush=True)


def sweep(result: dict) -> None:
    """Variants of the decode split policy and the prefill tile; the default is timed first
    and last, so its spread shows the noise."""
    base = TritonAttentionConfig()
    decode_variants = [("default", base), ("min_split 256", replace(base, decode_min_split_len=256)),
                       ("min_split 64, max 64", replace(base, decode_max_splits=64)),
                       ("stages 3", replace(base, decode_num_stages=3)),
                       ("warps 8", replace(base, decode_num_warps=8)),
                       ("pps 8", replace(base, decode_programs_per_sm=8)),
                       ("default again", base)]
    print("\ndecode variants (us a forward)")
    shapes = [(1, 512), (1, 2048), (1, 8192), (16, 512), (16, 2048), (16, 8192), (64, 512), (128, 2048)]
    print(f"  {'variant':<22}" + "".join(f"{f'{b}x{c}':>10}" for b, c in shapes))
    for name, cfg in decode_variants:
        backend = TritonBackend(cfg)
        times = []
        for b, c in shapes:
            row = decode_case(b, c, backend, check=False, with_sdpa=False)
            row.update(variant=name)
            result["decode_variants"].append(row)
            times.append(row["triton_us"])
            torch.cuda.empty_cache()
        print(f"  {name:<22}" + "".join(f"{t:>10.1f}" for t in times), flush=True)
    print("\nprefill variants (TFLOP/s)")
    pshapes = [[(0, 2048)] * 4, [(4096, 512)] * 4, [(0, 1000)] + [(1500, 1)] * 32]
    large = replace(base, prefill_large_min_query_len=1)
    prefill_variants = [("M64 N64 w4 s2", base), ("M64 N64 w4 s3", replace(base, prefill_num_stages=3)),
                        ("M64 N32 w4 s3", replace(base, prefill_block_n=32, prefill_num_stages=3)),
                        ("M64 N128 w8 s2", replace(base, prefill_block_n=128, prefill_num_warps=8)),
                        ("M128 N64 w8 s3", replace(large, prefill_num_stages=3)),
                        ("M128 N32 w4 s2", replace(large, prefill_block_n=32, prefill_large_num_warps=4)),
                        ("M64 N64 w4 s2 again", base)]
    print(f"  {'variant':<22}{'4x2048':>10}{'4x4096+512':>12}{'mixed':>10}")
    for name, cfg in prefill_variants:
        rows = [prefill_case(lens, cfg, with_sdpa=False) for lens in pshapes]
        for row in rows:
            row.update(variant=name)
            result["prefill_variants"].append(row)
        print(f"  {name:<22}{rows[0]['triton_tflops']:>10.0f}{rows[1]['triton_tflops']:>12.0f}"
              f"{rows[2]['triton_tflops']:>10.0f}", flush=True)


def main() -> None:
    global BANDWIDTH
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time tile / split variants")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--rope-store", action="store_true",
                        help="only the RoPE + K/V store case (unfused vs fused)")
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    BANDWIDTH = copy_bandwidth()
    print(f"{props.name}: {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB, "
          f"copy bandwidth {BANDWIDTH / 1e12:.2f} TB/s (read + write)")
    result = dict(gpu=props.name, num_sms=props.multi_processor_count, torch=torch.__version__,
                  copy_bandwidth_tb_s=BANDWIDTH / 1e12, decode=[], prefill=[], fused=[],
                  decode_variants=[], prefill_variants=[], rope_store=[])
    if args.rope_store:
        result["rope_store"] = rope_store_cases()
        print_rope_store(result["rope_store"])
        write_result(result, args.out, "rope_store_" + props.name)
        return

    backend = TritonBackend()
    batches, ctxs = ([1, 64], [512, 8192]) if args.quick else ([1, 16, 64, 128], [512, 2048, 8192])
    print(f"\ndecode, Llama-3.1-8B shape (Hq {HQ}, Hkv {HKV}, D {D}, bf16, block {BS}); back to back in one CUDA graph")
    print(f"{'batch':>5} {'ctx':>5} {'splits':>6} {'triton us':>10} {'sdpa us':>9} {'floor us':>9} "
          f"{'TB/s':>6} {'of floor':>8} {'x sdpa':>7} {'err':>8}")
    for b in batches:
        for c in ctxs:
            row = decode_case(b, c, backend, check=True)
            result["decode"].append(row)
            print(f"{b:>5} {c:>5} {row['splits']:>6} {row['triton_us']:>10.1f} {row['sdpa_us']:>9.1f} "
                  f"{row['floor_us']:>9.1f} {row['triton_tb_s']:>6.2f} {row['of_floor']:>8.0%} "
                  f"{row['vs_sdpa']:>7.2f} {row['rel_err_vs_sdpa']:>8.1e}", flush=True)
            torch.cuda.empty_cache()

    print("\nprefill (causal, K/V through the block table; TFLOP/s of attention computed)")
    prefill_sets = [[(0, 2048)] * 4, [(0, 512)] * 16, [(4096, 512)] * 4, [(0, 8192)],
                    [(0, 1000)] + [(1500, 1)] * 32]
    for lens in [] if args.skip_prefill else prefill_sets[:2] if args.quick else prefill_sets:
        row = prefill_case(lens, TritonAttentionConfig(), with_sdpa=True)
        result["prefill"].append(row)
        desc = f"{len(lens)} x (ctx {lens[0][0]}, new {lens[0][1]})" + (" + mixed" if len(set(lens)) > 1 else "")
        extra = (f"  sdpa {row['sdpa_ms']:.3f} ms {row['sdpa_tflops']:.0f} TFLOP/s" if "sdpa_ms" in row else "")
        print(f"  {desc:<34} {row['triton_ms']:8.3f} ms {row['triton_tflops']:6.0f} TFLOP/s{extra}", flush=True)

    if args.sweep:
        sweep(result)

    print("\nfused layer kernels, 4096 tokens (bf16)")
    for row in fused_cases():
        result["fused"].append(row)
        print(f"  {row['kernel']:<24} triton {row['triton_us']:8.1f} us  torch {row['torch_us']:8.1f} us  "
              f"floor {row['floor_us']:6.1f} us ({row['of_floor']:.0%})", flush=True)
    result["rope_store"] = rope_store_cases()
    print_rope_store(result["rope_store"])

    write_result(result, args.out, props.name)


def write_result(result: dict, out: Optional[str], name: str) -> None:
    """To ``out``, or bench/results/kernels_<name>.json."""
    out = out or os.path.join("bench", "results", "kernels_" + name.lower().replace(" ", "_") + ".json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {out}")


BANDWIDTH = 3.0e12  # replaced by the measured copy bandwidth in main()

if __name__ == "__main__":
    main()
