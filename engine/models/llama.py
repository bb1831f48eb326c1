"""Dense decoder: Llama 2/3, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

One flattened forward over all scheduled tokens of a step::

    input_ids (T,) -> embed -> [ norm -> attention -> norm -> MLP ] x L -> norm -> hidden (T, H)

Pipeline parallel (``pp_size > 1``): stage p builds only its layers
``stage_layers(L, p, pp_size)`` (the others are ``nn.Identity`` placeholders, so
parameter names keep their global layer index); the first stage owns the
embedding, the last the final norm and LM head. A non-last stage returns
``IntermediateTensors(hidden, residual)`` for the next stage, which passes it back
in as ``intermediate``::

    stage 0: ids -> embed -> layers[0:L/2]  -> (x, residual) ──send──▶
    stage 1:                 (x, residual) -> layers[L/2:L] -> norm -> hidden -> logits

Residual adds are fused into the norms (``RMSNorm(x, residual)``), so a layer
passes ``(x, residual)`` on. Attention layer i reads and writes the paged KV
cache ``ctx.kv_caches[i]`` through ``ctx.backend``; the model never sees blocks.

Parameter names follow the HF checkpoint except for fused projections:
``q_proj/k_proj/v_proj -> qkv_proj`` and ``gate_proj/up_proj -> gate_up_proj``.
``load_weights`` maps names, slices each rank's shard, and fails loudly on
unknown or missing weights. ``moe.py`` reuses everything here but the MLP.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from engine.attention.base import ForwardContext
from engine.distributed.topology import stage_layers
from engine.models.layers import (Communicator, MergedColumnParallelLinear, ParallelLMHead,
                                  QKVParallelLinear, RMSNorm, RowParallelLinear,
                                  VocabParallelEmbedding, silu_and_mul)
from engine.models.rotary import RotaryEmbedding
from engine.models.spec import ModelSpec

# (our fused name, HF name, shard id) for projections stored fused.
STACKED_PARAMS = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)
SKIPPED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed, never loaded

# One tensor for one (param, shard) of ours: (param name, shard id, tensor).
WeightTarget = tuple[str, Any, torch.Tensor]


@dataclass
class IntermediateTensors:
    """What one pipeline stage hands the next: the last layer's output and the residual."""

    hidden: torch.Tensor  # (T, H)
    residual: torch.Tensor  # (T, H)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                 tp_rank: int, tp_size: int, comm: Optional[Communicator]) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which KV cache tensor of ctx.kv_caches is ours
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads,
                                          spec.num_kv_heads, spec.qkv_bias, tp_rank, tp_size, comm)
        # With TP (and no bias, which must be added once after the sum) o_proj leaves its
        # partial sum to the next norm, which completes it (fused all-reduce + add + norm).
        self.partial_output = tp_size > 1 and not spec.o_proj_bias
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size,
                                        spec.o_proj_bias, tp_rank, tp_size, comm,
                                        reduce_results=not self.partial_output,
                                        send_partial=self.partial_output)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.rotary = rotary  # shared by all layers
        self.scale = spec.head_dim ** -0.5

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))  # (T, Hq, D), (T, Hkv, D), (T, Hkv, D)
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head's D before RoPE
            q, k = self.q_norm.normalize(q), self.k_norm.normalize(k)
        # RoPE, K/V store and attention; a backend may fuse the first two (one launch).
        out = ctx.backend.forward_with_rotary(self.rotary, positions, q, k, v,
                                              ctx.kv_caches[self.layer_idx], ctx.attn_metadata,
                                              self.scale)  # (T, Hq, D)
        return self.o_proj(out.reshape(out.shape[0], -1))  # (T, H)


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp_rank: int, tp_size: int,
                 comm: Optional[Communicator], reduce_results: bool = True,
                 send_partial: bool = False) -> None:
        """``send_partial``: the partial output goes unchanged to the group's next reduction
        (the dense decoder's next norm; not an MoE block's shared expert, which is added to
        the experts' output first)."""
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2,
                                                       False, tp_rank, tp_size, comm)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, tp_rank, tp_size,
                                           comm, reduce_results=reduce_results, send_partial=send_partial)
        self.partial_output = tp_size > 1 and not reduce_results  # the caller completes the sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))  # (T, 2I/tp) -> (T, I/tp) -> (T, H)


class DecoderLayer(nn.Module):
    """norm -> attention -> norm -> MLP. A sub-block whose ``partial_output`` is set returns
    its row-parallel partial sum; the norm after it completes the sum (``reduce=comm``). The
    MLP's partial output goes on to the next layer's input norm (``x_partial``)."""

    def __init__(self, spec: ModelSpec, attn: Attention, mlp: nn.Module,
                 comm: Optional[Communicator] = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = mlp
        self.comm = comm
        self.mlp_partial = getattr(mlp, "partial_output", False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor],
                ctx: ForwardContext, x_partial: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.input_layernorm(x, residual, reduce=self.comm if x_partial else None)
        x = self.self_attn(positions, x, ctx)
        x, residual = self.post_attention_layernorm(
            x, residual, reduce=self.comm if self.self_attn.partial_output else None)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Embedding (first stage), this stage's layers, final norm (last stage)."""

    def __init__(self, spec: ModelSpec, layers: list[nn.Module], layer_range: range,
                 is_first_stage: bool, is_last_stage: bool, tp_rank: int, tp_size: int,
                 comm: Optional[Communicator]) -> None:
        super().__init__()
        self.embed_tokens = (VocabParallelEmbedding(spec.vocab_size, spec.hidden_size,
                                                    tp_rank, tp_size, comm) if is_first_stage else None)
        self.layers = nn.ModuleList(layers)  # all L entries; nn.Identity outside layer_range
        self.layer_range = layer_range
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps) if is_last_stage else None
        self.comm = comm

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                intermediate: Optional[IntermediateTensors] = None
                ) -> "torch.Tensor | IntermediateTensors":
        # partial: x is a partial sum over the TP group, not yet reduced (the embedding shards'
        # lookups, then each layer's MLP output); the next norm completes it
        if self.embed_tokens is not None:
            x, residual = self.embed_tokens.partial(input_ids), None  # (T, H)
            partial = self.embed_tokens.tp_size > 1
        else:
            x, residual = intermediate.hidden, intermediate.residual
            partial = False
        for i in self.layer_range:
            x, residual = self.layers[i](positions, x, residual, ctx, partial)
            partial = self.layers[i].mlp_partial
        if self.norm is None:  # the next stage gets whole sums
            return IntermediateTensors(self.comm.all_reduce(x) if partial else x, residual)
        x, _ = self.norm(x, residual, reduce=self.comm if partial else None)
        return x  # (T, H)


class LlamaForCausalLM(nn.Module):
    """The model contract every architecture follows (see ``registry.py``)."""

    def __init__(self, spec: ModelSpec, tp_rank: int = 0, tp_size: int = 1,
                 comm: Optional[Communicator] = None, pp_rank: int = 0, pp_size: int = 1,
                 ep_rank: int = 0, ep_size: int = 1) -> None:
        """``comm`` is the stage group's communicator (TP collectives, and EP for MoE layers);
        ``pp_*`` pick this stage's layers; ``ep_*`` partition MoE experts (see moe.py)."""
        super().__init__()
        self.spec = spec
        self.tp_rank, self.tp_size, self.comm = tp_rank, tp_size, comm
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.layer_range = stage_layers(spec.num_layers, pp_rank, pp_size)
        if len(self.layer_range) == 0:
            raise ValueError(f"pipeline stage {pp_rank} of {pp_size} has no layers "
                             f"(num_hidden_layers {spec.num_layers})")
        self.is_first_stage, self.is_last_stage = pp_rank == 0, pp_rank == pp_size - 1
        rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta,
                                 spec.rope_scaling)
        start = self.layer_range.start  # attention i reads ctx.kv_caches[i - start]: this stage's caches
        layers = [DecoderLayer(spec, Attention(spec, i - start, rotary, tp_rank, tp_size, comm),
                               self._make_mlp(i), comm) if i in self.layer_range else nn.Identity()
                  for i in range(spec.num_layers)]
        self.model = DecoderModel(spec, layers, self.layer_range, self.is_first_stage,
                                  self.is_last_stage, tp_rank, tp_size, comm)
        self.lm_head = (ParallelLMHead(spec.vocab_size, spec.hidden_size, tp_rank, tp_size, comm)
                        if self.is_last_stage else None)
        self.tie_weights()
        self.num_layers = len(self.layer_range)  # this stage's layers = its KV cache tensors
        self.head_dim = spec.head_dim
        self.num_kv_heads = layers[start].self_attn.qkv_proj.num_kv_heads  # per rank

    def tie_weights(self) -> None:
        """lm_head shares the embedding tensor (same vocab sharding) when the spec says so.

        Only when one stage holds both; with pipeline stages the last stage loads the
        checkpoint's embedding into its own ``lm_head`` (``map_weight``)."""
        if self.spec.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _make_mlp(self, layer_idx: int) -> nn.Module:
        return DenseMLP(self.spec.hidden_size, self.spec.intermediate_size,
                        self.tp_rank, self.tp_size, self.comm, reduce_results=self.tp_size == 1,
                        send_partial=True)  # the next norm (or stage hand-off) reduces it unchanged

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                intermediate: Optional[IntermediateTensors] = None
                ) -> "torch.Tensor | IntermediateTensors":
        """input_ids, positions (T,) -> hidden (T, hidden_size) on the last stage, else the
        ``IntermediateTensors`` for the next stage (which passes them as ``intermediate``)."""
        return self.model(input_ids, positions, ctx, intermediate)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """hidden (R, hidden_size) -> logits (R, vocab_size) float32 (``upcast=False``: the
        model's dtype, enough for an argmax). Last stage only."""
        return self.lm_head.compute_logits(hidden, upcast)

    def greedy_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (R, hidden_size) -> (R,) int64, the argmax of ``compute_logits(hidden,
        upcast=False)`` without gathering vocab-parallel logits. Last stage only."""
        return self.lm_head.greedy_ids(hidden)

    # ---- weights ------------------------------------------------------------------------------
    def map_weight(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        """HF checkpoint name -> the (param, shard) it fills; [] for weights we skip."""
        if name.endswith(SKIPPED_WEIGHT_SUFFIXES) or not self._is_on_this_stage(name):
            return []
        if name == "lm_head.weight" and self.spec.tie_word_embeddings:
            return []  # some tied checkpoints still store it; the embedding is the source
        if name == "model.embed_tokens.weight" and self.spec.tie_word_embeddings:
            targets = [(name, None, tensor)] if self.is_first_stage else []
            if self.is_last_stage and not self.is_first_stage:  # untied copy on the last stage
                targets.append(("lm_head.weight", None, tensor))
            return targets
        for fused, hf, shard_id in STACKED_PARAMS:
            if hf in name:
                return [(name.replace(hf, fused), shard_id, tensor)]
        return [(name, None, tensor)]

    def _is_on_this_stage(self, name: str) -> bool:
        """Whether a checkpoint weight belongs to this pipeline stage."""
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) in self.layer_range
        if name.startswith("model.embed_tokens."):
            return self.is_first_stage or (self.is_last_stage and self.spec.tie_word_embeddings)
        if name.startswith(("model.norm.", "lm_head.")):
            return self.is_last_stage
        return True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF tensors (any order, any device); each layer keeps its rank's shard.

        Raises ValueError on a weight we do not know or a parameter left unloaded.
        """
        params = dict(self.named_parameters())  # tied lm_head appears once, as embed_tokens
        loaded: dict[str, set[Any]] = defaultdict(set)
        for hf_name, tensor in weights:
            for param_name, shard_id, part in self.map_weight(hf_name, tensor):
                if param_name not in params:
                    raise ValueError(f"checkpoint weight {hf_name!r} does not match any parameter of "
                                     f"{type(self).__name__} ({self.spec.architecture.value})")
                module_name, _, local_name = param_name.rpartition(".")
                module = self.get_submodule(module_name)
                loader = getattr(module, "weight_loader", None)
                with torch.no_grad():
                    if loader is not None:
                        try:
                            loader(params[param_name], part, shard_id)
                        except ValueError as e:
                            raise ValueError(f"checkpoint weight {hf_name!r}: {e}") from None
                    elif params[param_name].shape != part.shape:
                        raise ValueError(f"checkpoint weight {hf_name!r}: shape {tuple(part.shape)}, "
                                         f"expected {tuple(params[param_name].shape)}")
                    else:
                        params[param_name].copy_(part)
                loaded[param_name].add(shard_id)
        missing = []
        for param_name in params:
            module_name, _, local_name = param_name.rpartition(".")
            expected = getattr(self.get_submodule(module_name), "shard_ids", {}).get(local_name, (None,))
            absent = set(expected) - loaded[param_name]
            if absent:
                missing.append(param_name if expected == (None,) else
                               f"{param_name} (shards {sorted(map(str, absent))})")
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing weights for {shown}")
