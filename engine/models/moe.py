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
    """The routed experts of one layer; each rank holds a slice of every expert's I."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 tp_rank: int = 0, tp_size: int = 1, comm: Optional[Communicator] = None) -> None:
        super().__init__(tp_rank, tp_size, comm)
        self.num_experts = num_experts
        self.intermediate_size_per_rank = divide(intermediate_size, tp_size, "moe_intermediate_size")
        size = self.intermediate_size_per_rank
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, size))
        self.shard_ids = {  # every (projection, expert) must be loaded
            "w13": tuple((proj, e) for e in range(num_experts) for proj in ("gate", "up")),
            "w2": tuple(("down", e) for e in range(num_experts)),
        }

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: tuple[str, int]) -> None:
        """shard_id (proj, expert): one expert's full gate/up (I, H) or down (H, I) matrix."""
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
        """x (T, H); topk_weights, topk_ids (T, k) -> (T, H), a partial sum when tp > 1."""
        k = topk_ids.shape[1]
        flat_ids = topk_ids.flatten()  # (T * k,) entry t * k + j: token t's j-th expert
        order = torch.argsort(flat_ids, stable=True)  # entries grouped by expert
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()  # one host sync
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
                 comm: Optional[Communicator]) -> None:
        super().__init__()
        moe = spec.moe
        self.top_k = moe.top_k
        self.norm_topk_prob = moe.norm_topk_prob
        self.tp_size, self.comm = tp_size, comm
        self.gate = ReplicatedLinear(spec.hidden_size, moe.num_experts)  # router
        self.experts = FusedExperts(moe.num_experts, spec.hidden_size, moe.moe_intermediate_size,
                                    tp_rank, tp_size, comm)
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
        out = self.experts(x, topk_weights.to(x.dtype), topk_ids)  # (T, H)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.tp_size > 1:  # one reduction for routed + shared experts
            out = self.comm.all_reduce(out)
        return out


class MoEForCausalLM(LlamaForCausalLM):
    """Mixtral / Qwen2-MoE / Qwen3-MoE: the Llama decoder with MoE layers per ``spec.moe``."""

    def _make_mlp(self, layer_idx: int) -> nn.Module:
        if self.spec.moe.is_moe_layer(layer_idx):
            return SparseMoeBlock(self.spec, self.tp_rank, self.tp_size, self.comm)
        return super()._make_mlp(layer_idx)  # Qwen MoE: mlp_only_layers / decoder_sparse_step

    def map_weight(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's name for the MoE block
        legacy = _LEGACY_EXPERT.fullmatch(name)
        if legacy:
            prefix, expert, hf_proj = legacy.groups()
            proj = _EXPERT_PROJ[hf_proj]
            param = f"{prefix}.experts.{'w2' if proj == 'down' else 'w13'}"
            return [(param, (proj, int(expert)), tensor)]
        fused = _FUSED_EXPERT.fullmatch(name)
        if fused:
            prefix, hf_param = fused.groups()
            if hf_param == "down_proj":  # (E, H, I)
                return [(f"{prefix}.experts.w2", ("down", e), tensor[e]) for e in range(tensor.shape[0])]
            targets = []
            for e in range(tensor.shape[0]):  # (E, 2I, H) rows [gate ; up]
                gate, up = tensor[e].chunk(2, dim=0)
                targets += [(f"{prefix}.experts.w13", ("gate", e), gate),
                            (f"{prefix}.experts.w13", ("up", e), up)]
            return targets
        return super().map_weight(name, tensor)
