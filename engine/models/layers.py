"""Building blocks of the decoder, written for tensor parallelism (TP).

Every linear layer knows its ``tp_rank`` / ``tp_size`` and holds only its own
shard; its ``weight_loader(param, loaded_weight, shard_id)`` takes the FULL
checkpoint tensor and copies the rank's slice. With ``tp_size == 1`` the shard
is the whole tensor and no collective is ever called.

    ColumnParallelLinear   W (out, in)  split on out   -> each rank: its slice of the outputs
    RowParallelLinear      W (out, in)  split on in    -> partial sums, all_reduce(comm)
    VocabParallelEmbedding E (vocab, H) split on vocab -> masked lookup, all_reduce(comm)
    ParallelLMHead         E (vocab, H) split on vocab -> logits slice, all_gather(comm)

A Megatron MLP is Column (gate_up) then Row (down): one all_reduce per MLP;
attention is Column (qkv, heads split) then Row (o_proj): one per attention.
A dense decoder leaves both partial (``reduce_results=False``) and has the RMSNorm
that follows complete them (``RMSNorm(x, residual, reduce=comm)``): on GPUs that is one
kernel for all-reduce + residual add + norm (``Communicator.fused_all_reduce_rms_norm``).
KV heads are replicated when ``num_kv_heads < tp_size`` (each rank keeps one).

Weights are created with ``torch.empty`` so the loader can build the model on
the meta device and materialise it once, in the target dtype, on the target device.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels as fused
from engine.kernels import gemv
from engine.kernels.greedy import greedy_argmax, pick_greedy, shard_greedy_table


class Communicator(Protocol):
    """The collectives TP layers need; implemented by the distributed executor."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group; returns the reduced tensor."""

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate the ranks' tensors along ``dim`` in rank order."""

    def linear_for_reduce(self, x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """x @ weight.T by a kernel that also sends it on for the group's very next reduction
        (which must take this output), or None where there is none."""

    def fused_all_reduce_rms_norm(self, x: torch.Tensor, residual: Optional[torch.Tensor],
                                  weight: torch.Tensor, eps: float
                                  ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """all_reduce(x) then RMSNorm(x, residual) in one kernel, or None where there is none."""


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


class TPLayer(nn.Module):
    """Holds the rank, group size and communicator of a TP-aware layer."""

    def __init__(self, tp_rank: int, tp_size: int, comm: Optional[Communicator]) -> None:
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")
        if tp_size > 1 and comm is None:
            raise ValueError("tensor parallelism (tp_size > 1) needs a communicator")
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.comm = comm


def shard_of(loaded: torch.Tensor, dim: int, index: int, size: int, num_shards: int,
             name: str) -> torch.Tensor:
    """Slice ``index`` of ``num_shards`` equal slices of ``size`` along ``dim``, after checking
    that the full checkpoint tensor has exactly ``num_shards * size`` there."""
    if loaded.dim() <= dim or loaded.shape[dim] != size * num_shards:
        raise ValueError(f"{name}: checkpoint tensor has shape {tuple(loaded.shape)}, expected "
                         f"{size * num_shards} along dim {dim}")
    return loaded.narrow(dim, index * size, size)


def _copy_into(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"{name}: checkpoint shard has shape {tuple(loaded.shape)}, "
                         f"expected {tuple(param.shape)}")
    param.data.copy_(loaded)


# ---- norms and activations ------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32; optionally fused with the residual add."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., hidden) in x's dtype."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                reduce: Optional[Communicator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); with no residual, (norm(x), x).

        ``reduce``: x is a partial sum over that group's ranks (a row-parallel layer's output),
        completed here first: in one fused kernel where the group has one."""
        if reduce is not None:
            fused_out = reduce.fused_all_reduce_rms_norm(x, residual, self.weight, self.eps)
            if fused_out is not None:
                return fused_out
            x = reduce.all_reduce(x)
        if x.is_cuda:  # one fused Triton pass (add + norm) instead of several elementwise kernels
            return fused.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        return self.normalize(x), x


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2 * I) laid out [gate | up] -> (..., I) = silu(gate) * up."""
    if gate_up.is_cuda:
        return fused.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---- linear layers --------------------------------------------------------------------------

class ReplicatedLinear(nn.Module):
    """Every rank holds the whole weight (routers, small gates)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.bias = nn.Parameter(torch.empty(output_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        _copy_into(param, loaded_weight, type(self).__name__)


class ColumnParallelLinear(TPLayer):
    """y = x W^T + b with W (output_size, input_size) split on outputs; y stays split."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1, comm: Optional[Communicator] = None) -> None:
        super().__init__(tp_rank, tp_size, comm)
        self.input_size = input_size
        self.output_size_per_rank = divide(output_size, tp_size, "output size")
        self.weight = nn.Parameter(torch.empty(self.output_size_per_rank, input_size))
        self.bias = nn.Parameter(torch.empty(self.output_size_per_rank)) if bias else None

    small_batch_gemv = True  # engine/kernels/gemv.py may take batches of a few rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv.linear(x, self.weight, self.bias)  # (T, output_size / tp)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        name = type(self).__name__
        size = param.shape[0]
        _copy_into(param, shard_of(loaded_weight, 0, self.tp_rank, size, self.tp_size, name), name)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul, e.g. [gate | up] of an MLP.

    Per rank: W = [gate rows of this rank ; up rows of this rank], so the
    output splits in halves locally without any communication.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1, comm: Optional[Communicator] = None) -> None:
        self.output_sizes_per_rank = [divide(s, tp_size, "output size") for s in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size, comm)
        shards = tuple(range(len(output_sizes)))
        self.shard_ids = {"weight": shards, "bias": shards}  # every shard must be loaded

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """shard_id: index into output_sizes (0 = gate, 1 = up); the full sub-matrix is given."""
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes_per_rank):
            raise ValueError(f"MergedColumnParallelLinear needs shard_id in "
                             f"0..{len(self.output_sizes_per_rank) - 1}, got {shard_id!r}")
        size = self.output_sizes_per_rank[shard_id]
        offset = sum(self.output_sizes_per_rank[:shard_id])
        name = f"merged shard {shard_id}"
        src = shard_of(loaded_weight, 0, self.tp_rank, size, self.tp_size, name)
        _copy_into(param.data.narrow(0, offset, size), src, name)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections in one matmul; heads split across ranks.

    Per rank output (T, (Hq + 2 * Hkv) * D) laid out [q heads | k heads | v heads].
    With num_kv_heads < tp_size each KV head is replicated on tp_size / num_kv_heads ranks.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_rank: int = 0, tp_size: int = 1,
                 comm: Optional[Communicator] = None) -> None:
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp_size, "num_attention_heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = divide(num_kv_heads, tp_size, "num_key_value_heads")
            self.num_kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.num_kv_replicas = divide(tp_size, num_kv_heads, "tp_size over num_key_value_heads")
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out, bias, tp_rank, tp_size, comm)
        self.q_size = self.num_heads * head_dim  # per rank
        self.kv_size = self.num_kv_heads * head_dim  # per rank
        self.shard_ids = {"weight": ("q", "k", "v"), "bias": ("q", "k", "v")}  # every shard must be loaded

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """shard_id: "q", "k" or "v"; the full q/k/v matrix (or bias) is given."""
        if shard_id == "q":
            offset, size, src_index, num_shards = 0, self.q_size, self.tp_rank, self.tp_size
        elif shard_id in ("k", "v"):
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, src_index = self.kv_size, self.tp_rank // self.num_kv_replicas
            num_shards = self.tp_size // self.num_kv_replicas
        else:
            raise ValueError(f"QKVParallelLinear needs shard_id 'q', 'k' or 'v', got {shard_id!r}")
        name = f"{shard_id}_proj"
        src = shard_of(loaded_weight, 0, src_index, size, num_shards, name)
        _copy_into(param.data.narrow(0, offset, size), src, name)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T, q_size + 2 kv_size) -> q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, D)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        num_tokens = qkv.shape[0]
        return (q.view(num_tokens, self.num_heads, self.head_dim),
                k.view(num_tokens, self.num_kv_heads, self.head_dim),
                v.view(num_tokens, self.num_kv_heads, self.head_dim))


class RowParallelLinear(TPLayer):
    """y = x W^T + b with W (output_size, input_size) split on inputs; x arrives split.

    Each rank computes a partial sum; ``all_reduce`` completes it. The bias is
    added once, after the reduction. ``reduce_results=False`` leaves the partial
    sum for the caller to reduce (an MoE block reduces experts + shared expert once).
    ``send_partial=True`` (with ``reduce_results=False``) says the caller's very next
    collective reduces this output unchanged, so the communicator may start sending it
    from inside the GEMV (``Communicator.linear_for_reduce``: the LL all-reduce's push).
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1, comm: Optional[Communicator] = None,
                 reduce_results: bool = True, send_partial: bool = False) -> None:
        super().__init__(tp_rank, tp_size, comm)
        self.input_size_per_rank = divide(input_size, tp_size, "input size")
        self.reduce_results = reduce_results
        self.send_partial = send_partial and tp_size > 1 and not reduce_results and not bias
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_rank))
        self.bias = nn.Parameter(torch.empty(output_size)) if bias else None

    small_batch_gemv = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.send_partial and x.shape[0] == 1:  # a decode row: the GEMV may push it too
            y = self.comm.linear_for_reduce(x, self.weight)
            if y is not None:
                return y  # (1, output_size), partial; already on its way to the peers
        y = gemv.linear(x, self.weight)  # (T, output_size), partial over ranks
        if self.tp_size > 1 and self.reduce_results:
            y = self.comm.all_reduce(y)
        return y + self.bias if self.bias is not None else y

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # bias: replicated
            _copy_into(param, loaded_weight, "row-parallel bias")
            return
        name = type(self).__name__
        size = param.shape[1]
        _copy_into(param, shard_of(loaded_weight, 1, self.tp_rank, size, self.tp_size, name), name)


# ---- embeddings and LM head -----------------------------------------------------------------

class VocabParallelEmbedding(TPLayer):
    """Embedding table split on the vocabulary; rank r owns ids [start, end).

    vocab_size is padded up to a multiple of tp_size; padding rows are zero
    and never looked up (ids are < vocab_size).
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int = 0, tp_size: int = 1,
                 comm: Optional[Communicator] = None) -> None:
        super().__init__(tp_rank, tp_size, comm)
        self.vocab_size = vocab_size
        self.num_rows_per_rank = -(-vocab_size // tp_size)  # ceil
        self.vocab_start = tp_rank * self.num_rows_per_rank
        self.vocab_end = min(self.vocab_start + self.num_rows_per_rank, vocab_size)
        self.weight = nn.Parameter(torch.empty(self.num_rows_per_rank, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) -> (T, hidden)."""
        out = self.partial(input_ids)
        return self.comm.all_reduce(out) if self.tp_size > 1 else out

    def partial(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) -> (T, hidden): this rank's part of the lookup, the rows of the ids it owns and
        zeros for the others, so the sum over the group is the embedding. The decoder leaves
        that sum to its first norm (one fused all-reduce + norm on GPUs, no separate call)."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        return fused.vocab_shard_embedding(input_ids, self.weight, self.vocab_start, self.vocab_end)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if loaded_weight.shape[0] != self.vocab_size:
            raise ValueError(f"embedding has {loaded_weight.shape[0]} rows, expected vocab_size "
                             f"{self.vocab_size}")
        num_rows = self.vocab_end - self.vocab_start
        param.data.zero_()
        _copy_into(param.data[:num_rows], loaded_weight.narrow(0, self.vocab_start, num_rows),
                   type(self).__name__)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection hidden -> vocab, split on the vocabulary like the embedding."""

    # At a few rows the projection is a GEMV over the whole (vocab / tp, hidden) table, the
    # step's largest weight read; gemv_tune times the Triton kernels against cuBLAS for it too.
    small_batch_gemv = True

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """(R, hidden) -> (R, vocab_size) float32 (``upcast=False``: the weights' dtype, for
        greedy-only batches, whose argmax is the same on the exact bf16/fp16 values)."""
        logits = gemv.linear(hidden, self.weight)  # (R, vocab / tp)
        if self.tp_size > 1:
            logits = self.comm.all_gather(logits, dim=-1)  # (R, padded vocab)
        logits = logits[:, :self.vocab_size]
        return logits.float() if upcast else logits

    def greedy_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, hidden) -> (R,) int64 on every rank: the first argmax over the vocabulary of
        ``compute_logits(hidden, upcast=False)``, without gathering the logits. Each rank takes
        its shard's maximum and first argmax, and one all-reduce of a zeroed (R, tp, 2) fp32
        table, where each rank fills its own column with (value, id), gives every rank all
        pairs (exact: one nonzero term per entry; ids < 2**24). The first rank holding the
        largest value has the lowest id among ties, as ``argmax`` over the whole row. On CUDA
        the table and the pick are Triton launches (engine/kernels/greedy.py: ``shard_greedy_table``,
        ``pick_greedy``): five launches with the GEMV and the all-reduce."""
        if self.tp_size == 1 or self.vocab_size >= 2 ** 24:  # ids exact in fp32 below 2**24
            return greedy_argmax(self.compute_logits(hidden, upcast=False))
        logits = gemv.linear(hidden, self.weight)  # (R, vocab / tp)
        owned = self.vocab_end - self.vocab_start  # the rest is padding
        table = shard_greedy_table(logits[:, :owned], self.tp_rank, self.tp_size, self.vocab_start)
        return pick_greedy(self.comm.all_reduce(table), self.tp_size)  # (R, tp * 2) summed -> (R,)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise TypeError("ParallelLMHead is not an embedding; call compute_logits(hidden)")
