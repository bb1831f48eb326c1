"""Small-batch linear layers: a Triton GEMV where it beats cuBLAS, chosen per weight shape.

At batch 1 a decode step is one read of every weight, so each linear layer should
run at the memory bandwidth. cuBLAS does for most shapes, not all: on an H100 the
8B shape's o_proj (4096 x 4096, bf16) took 20.8 us at batch 1 where reading its
33.5 MB takes 11.2 us, because the kernel cuBLAS picks tiles N by 64 and so runs
only 64 programs on 132 SMs (profile of bench/gpu_bench.py --decode-profile).

    linear(x, w, bias)     x (M, K), w (N, K) -> (M, N); the GEMV when M <= MAX_ROWS and the
                           shape was measured faster with it (gemv_tune.tune), else F.linear

Three Triton kernels: ``gemv`` (one program per BLOCK_N outputs, ``tl.dot`` over rows padded
to 16), ``gemv_split_k`` (K split over programs too, fp32 partials and a reduce launch: more
programs for shapes with few outputs) and, for one row only, ``gemv_row`` (no ``tl.dot``: a
multiply and a sum over K, so a program may take as few as 2 outputs, and small shapes still
spread over every SM without a second launch; on Hopper it runs as a programmatic dependent
launch that loads its first weight tile, or ``KVMESH_GEMV_PRELOAD`` bytes of its rows, before
it waits: engine/kernels/pdl.py, bench/gemv_preload.py).
``gemv_row_push`` is ``gemv_row`` that also stores its outputs into the peers' LL all-reduce
slots (a row-parallel layer's partial sums, at batch 1: see engine/distributed/ll_allreduce.py),
with the config tuned for ``gemv_row``, so bit-identical to it.

Which kernel a shape takes is ``_USE_GEMV``, filled once after loading by
``engine/kernels/gemv_tune.py`` (``tune(model)``), which times them; nothing is decided inside a
CUDA-graph capture. Off CUDA, in fp32 and untuned shapes use F.linear, so tests comparing fp32
GPU runs with the reference path are unaffected.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from engine.kernels import pdl

MAX_ROWS = 4  # batch rows the GEMV takes (padded to 16 inside tl.dot)
MAX_SPLIT_K = 8  # the largest SPLIT_K among the split-K configs
# (N, K, dtype) -> (kernel for one row, kernel for 2..MAX_ROWS rows); None: cuBLAS (F.linear).
# Written by gemv_tune.tune.
_USE_GEMV: dict[tuple[int, int, torch.dtype], tuple[Optional[str], Optional[str]]] = {}
# Bytes of its weight rows a one-row GEMV program loads before it waits for the kernel before
# it (PDL). 0: one (BLOCK_N, BLOCK_K) tile. More keeps HBM busy while that kernel still runs
# (an all-reduce waiting for a peer, attention), at the price of registers held meanwhile.
PRELOAD_ENV = "KVMESH_GEMV_PRELOAD"
PRELOAD_BYTES = int(os.environ.get(PRELOAD_ENV, "0") or 0)
# 0: the pushing GEMV reads the LL round word (and its peer's table entry) after its sum, as
# before stop 21; default 1: as soon as it may, so neither read's latency follows the sum
# (bench/push_gemv.py: the TP=2 push cost 6.4 -> 2.1 µs a layer over plain GEMVs on one H200)
PUSH_EARLY_ROUND_ENV = "KVMESH_PUSH_EARLY_ROUND"
PUSH_EARLY_ROUND = os.environ.get(PUSH_EARLY_ROUND_ENV, "1") not in ("", "0")


def _pre_k(args: dict, preload_bytes: Optional[int] = None) -> int:
    """PRE_K of a one-row GEMV launch: BLOCK_K times the largest power of two of tiles that fits
    ``preload_bytes`` (default PRELOAD_BYTES) per program and K; at least one tile. A function
    of the config, K and dtype only, so ``gemv_row`` and ``gemv_row_push`` agree (same sums,
    same bits)."""
    budget = PRELOAD_BYTES if preload_bytes is None else preload_bytes
    block_n, block_k, k = args["BLOCK_N"], args["BLOCK_K"], args["K"]
    tile_bytes = block_n * block_k * args["w_ptr"].element_size()
    tiles = 1
    while tiles * 2 * tile_bytes <= budget and tiles * 2 * block_k <= k:
        tiles *= 2
    return tiles * block_k

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install
    triton = None

if triton is not None:
    @triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                 for bn, bk, w, s in ((16, 256, 4, 5), (16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4),
                                      (32, 512, 4, 5), (32, 128, 4, 4), (64, 128, 4, 4), (16, 128, 2, 6))],
        key=["N", "K"])
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
        """One program: BLOCK_N outputs for all M rows, reading its BLOCK_N x K slab of w once."""
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :],
                        mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)  # (BLOCK_N, BLOCK_K)
            acc = tl.dot(x, tl.trans(w), acc)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                 for bn, bk, w, s in ((2, 2048, 4, 3), (2, 1024, 4, 2), (4, 1024, 4, 3), (4, 1024, 4, 4),
                                      (4, 2048, 8, 3), (8, 512, 4, 4), (8, 1024, 8, 3), (16, 512, 8, 3),
                                      (16, 256, 4, 4))],
        key=["N", "K"])
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                        "EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0,
                        "PRE_K": _pre_k})
    @triton.jit
    def _gemv_row_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_wn,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                         EVEN_N: tl.constexpr, PRE_K: tl.constexpr, PDL: tl.constexpr = False):
        """One row: program p computes out[p*BLOCK_N : (p+1)*BLOCK_N] = w[rows] @ x, keeping a
        (BLOCK_N, BLOCK_K) fp32 partial product and summing it over K once at the end. With no
        ``tl.dot`` there is no 16-row padding and BLOCK_N may be 2-8, so even a 3072-output
        shape makes enough programs to keep every SM's loads in flight."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        out, _ = _row_dot(x_ptr, w_ptr, rn, N, K, stride_wn, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, PDL, PRE_K,
                          w_ptr, 0, False)
        if EVEN_N:
            tl.store(out_ptr + rn, out.to(out_ptr.dtype.element_ty))
        else:
            tl.store(out_ptr + rn, out.to(out_ptr.dtype.element_ty), mask=rn < N)

    @triton.jit
    def _ll_round_word(table_ptr, world):
        """The LL round word (int64; its low half is the round), which the push table's entry
        ``world`` locates (``_gemv_row_push_kernel``)."""
        return tl.load(table_ptr + tl.load(table_ptr + world), volatile=True)

    @triton.jit
    def _row_dot(x_ptr, w_ptr, rn, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PDL: tl.constexpr, PRE_K: tl.constexpr,
                 table_ptr, world, PUSH: tl.constexpr):
        """(BLOCK_N,) fp32: w[rn] @ x for one row x (K,), keeping a (BLOCK_N, BLOCK_K) fp32
        partial product and summing it over K once at the end. PDL: launched as a dependent
        launch, it loads its first PRE_K columns of weight (``_pre_k``), then waits for the
        kernel before it (which writes x, and may still read what this program will write),
        then lets its own dependents start. With PRE_K = BLOCK_K the sum runs in the same order
        either way (bit-identical); a longer preload adds its tiles in a tree first.

        PUSH (``_gemv_row_push_kernel``): also returns the LL round word (int64, ``table_ptr``'s
        entry ``world`` locates it), read as soon as the kernel before has ended, so its latency
        hides behind the weight loads instead of following the sum; else 0."""
        w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn  # (BLOCK_N, 1)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        k_first: tl.constexpr = PRE_K if PDL else 0
        round_word = tl.zeros((), dtype=tl.int64)
        if PUSH and not PDL:
            round_word = _ll_round_word(table_ptr, world)
        if PDL:
            rp = tl.arange(0, PRE_K)
            if EVEN_K and EVEN_N:
                w0 = tl.load(w_rows + rp[None, :])  # (BLOCK_N, PRE_K)
            else:
                w0 = tl.load(w_rows + rp[None, :], mask=(rn[:, None] < N) & (rp[None, :] < K), other=0.0)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
            if PUSH:
                round_word = _ll_round_word(table_ptr, world)
            x0 = tl.load(x_ptr + rp, mask=rp < K, other=0.0)
            p = w0.to(tl.float32) * x0.to(tl.float32)[None, :]  # (BLOCK_N, PRE_K)
            if PRE_K == BLOCK_K:
                acc += p
            else:  # the preloaded tiles folded onto one: (BLOCK_N, PRE_K // BLOCK_K, BLOCK_K)
                acc += tl.sum(tl.reshape(p, (BLOCK_N, PRE_K // BLOCK_K, BLOCK_K)), axis=1)
        for k0 in range(k_first, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K and EVEN_N:
                x = tl.load(x_ptr + rk)  # (BLOCK_K,)
                w = tl.load(w_rows + rk[None, :])  # (BLOCK_N, BLOCK_K)
            else:
                x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
                w = tl.load(w_rows + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        return tl.sum(acc, axis=1), round_word

    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                        "EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0,
                        "PRE_K": _pre_k})
    @triton.jit
    def _gemv_row_push_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_wn, table_ptr, rank, world,
                              slot_words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PRE_K: tl.constexpr,
                              PDL: tl.constexpr = False, EARLY_ROUND: tl.constexpr = True,
                              SELF: tl.constexpr = False):
        """``_gemv_row_kernel``, and its outputs also stored straight into every peer's LL
        all-reduce receive slot for this rank (engine/distributed/ll_allreduce.py), so the LL
        call that sums them need not push them itself: the NVLink hop overlaps this GEMV.

        A slot holds the row as 16-byte lines {data0, R, data1, R}, 4 bf16/fp16 values a line;
        here each 8-byte half {two values, R} is one int64 store, which lands whole, so a reader
        that sees R in it sees its data (what the LL kernel's own 16-byte stores rely on too).
        R is the coming LL call's round: the round word + 1, read once the kernel before has
        ended (no LL call runs between, stream order: the last one has ended too).
        ``table_ptr`` (int64): entry q < world = (rank q's receive area - table_ptr) / 8, entry
        world = (my round word - table_ptr) / 8, so every address is table_ptr plus an offset (no
        integer-to-pointer casts); set up once, so a 2-rank group's one peer entry is read at
        the start. BLOCK_N is even (whole 8-byte halves per program); ``slot_words`` = int64
        words per (parity, rank) slot. EARLY_ROUND=False (``KVMESH_PUSH_EARLY_ROUND=0``): both
        reads after the sum, as before stop 21, for A/B runs.

        SELF (the LL all-reduce's no-wait mode, ``KVMESH_LL_NO_WAIT``): the outputs go into my
        own slot too, as flagged lines, and NOT into ``out``: the LL call then reads every
        rank's partial sums, mine included, through the flags and never waits for this kernel
        to end (an end that waits for its NVLink stores to be acknowledged). ``out`` is left
        unwritten: a plain store there could land after the LL call has ended and the memory
        has gone to a later kernel, as nothing would wait for it."""
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        peer_entry = tl.zeros((), dtype=tl.int64)
        own_entry = tl.zeros((), dtype=tl.int64)
        if EARLY_ROUND:  # a 2-rank group's one peer entry (the table never changes), used at the end
            peer_entry = tl.load(table_ptr + (1 - rank) * (world == 2))
            if SELF:
                own_entry = tl.load(table_ptr + rank)
        out, round_word = _row_dot(x_ptr, w_ptr, rn, N, K, stride_wn, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, PDL,
                                   PRE_K, table_ptr, world, EARLY_ROUND)
        if not EARLY_ROUND:  # the order before stop 21 (bench/push_gemv.py's A/B): after the sum
            round_word = _ll_round_word(table_ptr, world)
        out = out.to(out_ptr.dtype.element_ty)  # (BLOCK_N,), what the LL call will sum
        if not SELF:
            if EVEN_N:
                tl.store(out_ptr + rn, out)
            else:
                tl.store(out_ptr + rn, out, mask=rn < N)
        bits = out.to(tl.uint16, bitcast=True).to(tl.uint32)  # (BLOCK_N,)
        lo, hi = tl.split(tl.reshape(bits, (BLOCK_N // 2, 2)))  # values 2w and 2w+1
        words = (lo | (hi << 16)).to(tl.int64)  # (BLOCK_N // 2,) one {value, value} each
        round_ = ((round_word & 0xFFFFFFFF) + 1) & 0xFFFFFFFF
        packets = words | (round_ << 32)  # little-endian: {data, R}
        rw = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # word of the row
        slot = ((round_ & 1) * world + rank) * slot_words  # (parity, me), row 0
        if world == 2 and EARLY_ROUND:  # TP=2: the one peer, its table entry read at the start
            tl.store(table_ptr + peer_entry + slot + rw, packets, mask=rw * 2 < N)
            if SELF:  # then mine (the peer's lines have the longer way)
                tl.store(table_ptr + own_entry + slot + rw, packets, mask=rw * 2 < N)
        else:
            for q in range(0, world):
                if q != rank or SELF:
                    dst = table_ptr + tl.load(table_ptr + q) + slot
                    tl.store(dst + rw, packets, mask=rw * 2 < N)

    @triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=st)
                 for bn, bk, sk, w, st in ((32, 256, 4, 4, 4), (32, 256, 8, 4, 4), (64, 256, 4, 4, 4),
                                           (64, 128, 8, 4, 4), (16, 256, 4, 4, 4), (32, 512, 2, 4, 3),
                                           (64, 256, 2, 4, 4), (128, 128, 4, 8, 4))],
        key=["N", "K"])
    @triton.jit
    def _gemv_split_k_kernel(x_ptr, w_ptr, part_ptr, M, N, K, stride_xm, stride_wn,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                             BLOCK_M: tl.constexpr):
        """Program (n, s): BLOCK_N outputs over the s-th of SPLIT_K slices of K, fp32 partials in
        part (SPLIT_K, M, N). More programs than N / BLOCK_N alone gives, for shapes whose N is
        small against the SM count (o_proj: 4096 outputs)."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = pid_k * k_per_split
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :],
                        mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)  # (BLOCK_N, BLOCK_K)
            acc = tl.dot(x, tl.trans(w), acc)
        tl.store(part_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc,
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _split_k_reduce_kernel(part_ptr, out_ptr, M, N, stride_om, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        """out (M, N) = sum over the SPLIT_K partials (SPLIT_K, M, N), in the output dtype."""
        m = tl.program_id(1)
        rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + (s * M + m) * N + rn, mask=rn < N, other=0.0)
        tl.store(out_ptr + m * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=rn < N)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) with M <= MAX_ROWS, weight (N, K), both bf16/fp16 on CUDA -> (M, N)."""
    m, k = x.shape
    n = weight.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_kernel[grid](x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), BLOCK_M=16)
    return out


def gemv_row(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (1, K), weight (N, K), both bf16/fp16 on CUDA -> (1, N)."""
    if x.shape[0] != 1:
        raise ValueError(f"gemv_row takes one row, got x of shape {tuple(x.shape)}")
    n, k = weight.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    if pdl.gemv_pdl(x.device):
        _gemv_row_kernel[grid](x, weight, out, n, k, weight.stride(0), PDL=True, launch_pdl=True)
    else:
        _gemv_row_kernel[grid](x, weight, out, n, k, weight.stride(0))
    return out


def gemv_row_push(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, rank: int,
                  world: int, slot_words: int, self_slot: bool = False) -> Optional[torch.Tensor]:
    """``gemv_row``, also sending the (1, N) result into the peers' LL receive slots (see
    ``_gemv_row_push_kernel``; ``table`` and ``slot_words`` come from the LL all-reduce).
    ``self_slot``: into my own slot as well and not into the returned tensor, which is then
    only a handle for the LL call (its values are never written).
    Runs with the config the tuner picked for ``gemv_row`` at this shape, so the values are
    bit-identical to ``gemv_row``'s (and it is never autotuned: autotuning would push
    several times). None where ``gemv_tune.tune`` did not pick ``gemv_row`` for this shape or the
    dtype is not 2 bytes: the caller then takes the plain path."""
    if x.shape[0] != 1 or weight.dtype not in (torch.bfloat16, torch.float16) or x.dtype != weight.dtype:
        return None
    n, k = weight.shape
    config = _row_config(n, k, weight.dtype)
    if config is None or n % 4 or config.kwargs["BLOCK_N"] % 2:  # LL lines; whole 8-byte halves
        return None
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    on = pdl.gemv_pdl(x.device)
    _gemv_row_push_kernel[(triton.cdiv(n, config.kwargs["BLOCK_N"]),)](
        x, weight, out, n, k, weight.stride(0), table, rank, world, slot_words, **config.kwargs,
        num_warps=config.num_warps, num_stages=config.num_stages, PDL=on, launch_pdl=on,
        EARLY_ROUND=PUSH_EARLY_ROUND, SELF=self_slot)
    return out


_ROW_CONFIG: dict[tuple[int, int, torch.dtype], "triton.Config"] = {}


def _row_config(n: int, k: int, dtype: torch.dtype):
    """``gemv_row``'s tuned config for (N, K, dtype) where ``gemv_tune.tune`` chose it for one row, else
    None; looked up in the autotuner's cache once per shape, not on every call."""
    key = (n, k, dtype)
    if key not in _ROW_CONFIG:
        choice = _USE_GEMV.get(key)
        config = _tuned_config(_gemv_row_kernel, n, k, dtype) if choice and choice[0] == "row" else None
        if config is None:
            return None  # not (yet) tuned: asked again next time
        _ROW_CONFIG[key] = config
    return _ROW_CONFIG[key]


def _tuned_config(kernel, n: int, k: int, dtype: torch.dtype):
    """The config ``kernel``'s autotuner chose for (N, K, dtype), or None if it never ran there."""
    for tuned, config in kernel.cache.items():
        if tuned[0] == n and tuned[1] == k and str(dtype) in tuned:
            return config
    return None


def gemv_split_k(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``gemv`` with K split over programs: fp32 partials, then one reduce launch."""
    m, k = x.shape
    n = weight.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    part = torch.empty(MAX_SPLIT_K, m, n, dtype=torch.float32, device=x.device)  # (split, M, N)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    _gemv_split_k_kernel[grid](x, weight, part, m, n, k, x.stride(0), weight.stride(0), BLOCK_M=16)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _split_k_reduce_kernel[(triton.cdiv(n, 1024), m)](part, out, m, n, out.stride(0),
                                                       SPLIT_K=_split_k_of(n, k, weight.dtype), BLOCK=1024)
    return out


_SPLIT_K: dict[tuple[int, int, torch.dtype], int] = {}


def _split_k_of(n: int, k: int, dtype: torch.dtype) -> int:
    """SPLIT_K of the config the autotuner chose for (N, K) (its cache is keyed by N, K, dtypes);
    looked up once per shape, not on every call."""
    key = (n, k, dtype)
    if key not in _SPLIT_K:
        config = _tuned_config(_gemv_split_k_kernel, n, k, dtype)
        if config is None:
            raise RuntimeError(f"no tuned split-K GEMV config for {n}x{k} {dtype}")
        _SPLIT_K[key] = config.kwargs["SPLIT_K"]
    return _SPLIT_K[key]


_KERNELS = {"gemv": gemv, "split_k": gemv_split_k, "row": gemv_row}
_ONE_ROW_ONLY = frozenset({"row"})


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, or the GEMV that ``gemv_tune.tune`` measured fastest for this shape, for a few rows."""
    if x.dim() == 2 and x.shape[0] <= MAX_ROWS:
        choice = _USE_GEMV.get((weight.shape[0], weight.shape[1], weight.dtype))
        kernel = choice and choice[0 if x.shape[0] == 1 else 1]
        if kernel:
            y = _KERNELS[kernel](x, weight)
            return y + bias if bias is not None else y
    return F.linear(x, weight, bias)
