"""Dense decoder: Llama 2/3, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

One flattened forward over all scheduled tokens of a step::

    input_ids (T,) -> embed -> [ norm -> attention -> norm -> MLP ] x L -> norm -> hidden (T, H)

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
from typing import Any, Iterable, Optional

import torch
from torch import nn

from engine.attention.base import ForwardContext
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


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                 tp_rank: int, tp_size: int, comm: Optional[Communicator]) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which KV cache tensor of ctx.kv_caches is ours
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads,
                                          spec.num_kv_heads, spec.qkv_bias, tp_rank, tp_size, comm)
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size,
                                        spec.o_proj_bias, tp_rank, tp_size, comm)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.rotary = rotary  # shared by all layers
        self.scale = spec.head_dim ** -0.5

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))  # (T, Hq, D), (T, Hkv, D), (T, Hkv, D)
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head's D before RoPE
            q, k = self.q_norm.normalize(q), self.k_norm.normalize(k)
        q, k = self.rotary(positions, q, k)
        out = ctx.backend.forward(q, k, v, ctx.kv_caches[self.layer_idx], ctx.attn_metadata,
                                  self.scale)  # (T, Hq, D)
        return self.o_proj(out.reshape(out.shape[0], -1))  # (T, H)


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp_rank: int, tp_size: int,
                 comm: Optional[Communicator], reduce_results: bool = True) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2,
                                                       False, tp_rank, tp_size, comm)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, tp_rank, tp_size,
                                           comm, reduce_results=reduce_results)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))  # (T, 2I/tp) -> (T, I/tp) -> (T, H)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, attn: Attention, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = mlp

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor],
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec, layers: list[DecoderLayer], tp_rank: int, tp_size: int,
                 comm: Optional[Communicator]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size,
                                                   tp_rank, tp_size, comm)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, H)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        x, _ = self.norm(x, residual)
        return x  # (T, H)


class LlamaForCausalLM(nn.Module):
    """The model contract every architecture follows (see ``registry.py``)."""

    def __init__(self, spec: ModelSpec, tp_rank: int = 0, tp_size: int = 1,
                 comm: Optional[Communicator] = None) -> None:
        super().__init__()
        self.spec = spec
        self.tp_rank, self.tp_size, self.comm = tp_rank, tp_size, comm
        rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta,
                                 spec.rope_scaling)
        layers = [DecoderLayer(spec, Attention(spec, i, rotary, tp_rank, tp_size, comm), self._make_mlp(i))
                  for i in range(spec.num_layers)]
        self.model = DecoderModel(spec, layers, tp_rank, tp_size, comm)
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, tp_rank, tp_size, comm)
        self.tie_weights()
        self.num_layers = spec.num_layers
        self.head_dim = spec.head_dim
        self.num_kv_heads = layers[0].self_attn.qkv_proj.num_kv_heads  # per rank

    def tie_weights(self) -> None:
        """lm_head shares the embedding tensor (same vocab sharding) when the spec says so."""
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _make_mlp(self, layer_idx: int) -> nn.Module:
        return DenseMLP(self.spec.hidden_size, self.spec.intermediate_size,
                        self.tp_rank, self.tp_size, self.comm)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions (T,) -> hidden (T, hidden_size)."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (R, hidden_size) -> logits (R, vocab_size) float32."""
        return self.lm_head.compute_logits(hidden)

    # ---- weights ------------------------------------------------------------------------------
    def map_weight(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        """HF checkpoint name -> the (param, shard) it fills; [] for weights we skip."""
        if name.endswith(SKIPPED_WEIGHT_SUFFIXES):
            return []
        if name == "lm_head.weight" and self.spec.tie_word_embeddings:
            return []  # some tied checkpoints still store it; the embedding is the source
        for fused, hf, shard_id in STACKED_PARAMS:
            if hf in name:
                return [(name.replace(hf, fused), shard_id, tensor)]
        return [(name, None, tensor)]

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
