"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE.

Same decoder as ``llama.py``; only the MLP of MoE layers changes::

    router_logits = x @ gate^T                    (T, E)
    probs = softmax(router_logits) in fp32        (T, E)
    top_w, top_ids = topk(probs, k)               (T, k)   renormalised to sum 1 if norm_topk_prob
    out[t] = sum_j top_w[t, j] * expert_{top_ids[t, j]}(x[t])
           + sigmoid(x[t] @ shared_gate^T) * shared_expert(x[t])     (Qwen2-MoE only)

Experts are stacked into two 3-D parameters per layer and computed with a
plain loop over the experts that received tokens (readable; a grouped GEMM
kernel can replace ``FusedExperts.forward`` later)::

    w13: (E, 2 * I / tp, H)   rows [gate_e ; up_e] of expert e, this rank's slice of I
    w2:  (E, H, I / tp)

Expert parallel (``ep_size > 1``): rank r holds whole experts
``[r * E / ep, (r + 1) * E / ep)`` (no I slicing) and the others are never loaded.
Every rank of the stage group sees the same tokens (one scheduler per replica,
activations replicated), so dispatch needs no communication: each rank runs
its own experts on the tokens routed to them, and one all-reduce over the
group combines the top-k contributions (the reduce-scatter + all-gather pair)::

    rank 0: experts 0..E/2-1  ─┐
    rank 1: experts E/2..E-1  ─┴─ all_reduce(partial outputs) -> out (T, H) on every rank

With ``tp > 1`` as well (``ep == tp``), attention stays TP-sharded over the same
ranks and the one all-reduce covers routed and shared experts together.

Checkpoint layouts accepted for expert weights (both appear in the wild):

    legacy (hub checkpoints; transformers 5 save_pretrained by default):
        Mixtral   ...block_sparse_moe.experts.{e}.w1/w3/w2.weight      (I, H), (I, H), (H, I)
        Qwen MoE  ...mlp.experts.{e}.gate_proj/up_proj/down_proj.weight
    fused (transformers 5 in-memory layout; save_pretrained(save_original_format=False)):
        ...mlp.experts.gate_up_proj  (E, 2I, H) rows [gate ; up]
        ...mlp.experts.down_proj     (E, H, I)
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.layers import (Communicator, ReplicatedLinear, TPLayer, divide, shard_of,
                                  silu_and_mul)
from engine.models.llama import DenseMLP, LlamaForCausalLM, WeightTarget
from engine.models.spec import ModelSpec

_LEGACY_EXPERT = re.compile(r"(.*)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_FUSED_EXPERT = re.compile(r"(.*)\.experts\.(gate_up_proj|down_proj)")
_EXPERT_PROJ = {"w1": "gate", "w3": "up", "w2": "down",
                "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class FusedExperts(TPLayer):
    """The routed experts of one layer held by this rank: with ``ep_size`` 1 a slice of every
    expert's I (``tp_*``), else whole experts ``[expert_start, expert_start + num_local_experts)``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 tp_rank: int = 0, tp_size: int = 1, comm: Optional[Communicator] = None,
                 ep_rank: int = 0, ep_size: int = 1) -> None:
        super().__init__(tp_rank, tp_size, comm)
        self.num_experts = num_experts
        self.num_local_experts = divide(num_experts, ep_size, "num_experts (by expert_parallel_size)")
        self.expert_start = ep_rank * self.num_local_experts
        self.intermediate_size_per_rank = divide(intermediate_size, tp_size, "moe_intermediate_size")
        size, num_local = self.intermediate_size_per_rank, self.num_local_experts
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_local, hidden_size, size))
        self.shard_ids = {  # every (projection, local expert) must be loaded
            "w13": tuple((proj, e) for e in range(num_local) for proj in ("gate", "up")),
            "w2": tuple(("down", e) for e in range(num_local)),
        }

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: tuple[str, int]) -> None:
        """shard_id (proj, local expert): one expert's full gate/up (I, H) or down (H, I) matrix."""
        proj, expert = shard_id
        size = self.intermediate_size_per_rank
        name = f"expert {expert} {proj}"
        if proj in ("gate", "up"):
            src = shard_of(loaded_weight, 0, self.tp_rank, size, self.tp_size, name)  # (I/tp, H)
            dst = param.data[expert].narrow(0, 0 if proj == "gate" else size, size)
        elif proj == "down":
            src = shard_of(loaded_weight, 1, self.tp_rank, size, self.tp_size, name)  # (H, I/tp)
            dst = param.data[expert]
        else:
            raise ValueError(f"unknown expert projection {proj!r}")
        if dst.shape != src.shape:
            raise ValueError(f"{name}: checkpoint shard has shape {tuple(src.shape)}, "
                             f"expected {tuple(dst.shape)}")
        dst.copy_(src)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        """x (T, H); topk_weights, topk_ids (T, k) global ids -> (T, H), a partial sum when
        tp > 1 (slices of I) or ep > 1 (only this rank's experts contribute)."""
        k = topk_ids.shape[1]
        # (T * k,) entry t * k + j: token t's j-th expert, as a local index; other ranks'
        # experts map to num_local_experts, a bucket past the end that is never computed.
        local_ids = topk_ids.flatten() - self.expert_start
        is_local = (local_ids >= 0) & (local_ids < self.num_local_experts)
        flat_ids = torch.where(is_local, local_ids, self.num_local_experts)
        order = torch.argsort(flat_ids, stable=True)  # entries grouped by local expert
        counts = torch.bincount(flat_ids, minlength=self.num_local_experts + 1).tolist()  # one host sync
        counts = counts[:self.num_local_experts]
        token_idx = order // k  # (T * k,) token of each grouped entry
        weights = topk_weights.flatten()[order]  # (T * k,)
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_idx[start:start + count]  # (n,)
            h = silu_and_mul(F.linear(x[tokens], self.w13[expert]))  # (n, I/tp)
            h = F.linear(h, self.w2[expert]) * weights[start:start + count, None]  # (n, H)
            out.index_add_(0, tokens, h)
            start += count
        return out


class SparseMoeBlock(nn.Module):
    def __init__(self, spec: ModelSpec, tp_rank: int, tp_size: int,
                 comm: Optional[Communicator], ep_rank: int = 0, ep_size: int = 1) -> None:
        super().__init__()
        moe = spec.moe
        self.top_k = moe.top_k
        self.norm_topk_prob = moe.norm_topk_prob
        self.tp_size, self.ep_size, self.comm = tp_size, ep_size, comm
        self.gate = ReplicatedLinear(spec.hidden_size, moe.num_experts)  # router
        expert_tp_rank, expert_tp_size = (tp_rank, tp_size) if ep_size == 1 else (0, 1)
        self.experts = FusedExperts(moe.num_experts, spec.hidden_size, moe.moe_intermediate_size,
                                    expert_tp_rank, expert_tp_size, comm, ep_rank, ep_size)
        self.shared_expert: Optional[DenseMLP] = None
        self.shared_expert_gate: Optional[ReplicatedLinear] = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(spec.hidden_size, moe.shared_expert_intermediate_size,
                                          tp_rank, tp_size, comm, reduce_results=False)
            self.shared_expert_gate = ReplicatedLinear(spec.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, H) -> (T, H)."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (T, E) fp32
        topk_weights, topk_ids = probs.topk(self.top_k, dim=-1)  # (T, k)
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, topk_weights.to(x.dtype), topk_ids)  # (T, H), partial over the group
        shared = None
        if self.shared_expert is not None:  # partial over TP ranks, whole when tp == 1
            shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.tp_size > 1:  # one reduction for routed + shared experts (ep is 1 or tp)
            return self.comm.all_reduce(out if shared is None else out + shared)
        if self.ep_size > 1:  # attention replicated: reduce the routed part only
            out = self.comm.all_reduce(out)
        return out if shared is None else out + shared


class MoEForCausalLM(LlamaForCausalLM):
    """Mixtral / Qwen2-MoE / Qwen3-MoE: the Llama decoder with MoE layers per ``spec.moe``."""

    def _make_mlp(self, layer_idx: int) -> nn.Module:
        if self.spec.moe.is_moe_layer(layer_idx):
            return SparseMoeBlock(self.spec, self.tp_rank, self.tp_size, self.comm,
                                  self.ep_rank, self.ep_size)
        return super()._make_mlp(layer_idx)  # Qwen MoE: mlp_only_layers / decoder_sparse_step

    def map_weight(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's name for the MoE block
        if not self._is_on_this_stage(name):
            return []
        # Expert ids below are global; only this EP rank's experts are kept, as local indices.
        experts_per_rank = self.spec.moe.num_experts // self.ep_size
        start = self.ep_rank * experts_per_rank
        local = range(start, start + experts_per_rank)
        legacy = _LEGACY_EXPERT.fullmatch(name)
        if legacy:
            prefix, expert, hf_proj = legacy.groups()
            if int(expert) not in local:
                return []
            proj = _EXPERT_PROJ[hf_proj]
            param = f"{prefix}.experts.{'w2' if proj == 'down' else 'w13'}"
            return [(param, (proj, int(expert) - start), tensor)]
        fused = _FUSED_EXPERT.fullmatch(name)
        if fused:
            prefix, hf_param = fused.groups()
            if hf_param == "down_proj":  # (E, H, I)
                return [(f"{prefix}.experts.w2", ("down", e - start), tensor[e]) for e in local]
            targets = []
            for e in local:  # (E, 2I, H) rows [gate ; up]
                gate, up = tensor[e].chunk(2, dim=0)
                targets += [(f"{prefix}.experts.w13", ("gate", e - start), gate),
                            (f"{prefix}.experts.w13", ("up", e - start), up)]
            return targets
        return super().map_weight(name, tensor)
