"""Tiny random HF checkpoints for tests, built locally (no model hub).

    from tests.hf_checkpoints import make_tiny_checkpoint, load_hf_model
    path = make_tiny_checkpoint("qwen3", tmp_path / "qwen3")      # config.json + model.safetensors
    hf = load_hf_model(path)                                        # the HF reference, fp32, eval

Every model has 2 layers, hidden 64, 4 query / 2 KV heads of dim 16, vocab 512,
and MoE models 4 experts with top-2 routing. Weights are drawn with a fixed seed
and a large ``initializer_range`` (0.3), so greedy decoding has clear logit
margins and HF vs kvmesh token comparisons are not flaky. Token ids 1 and 2 are
bos/eos. No tokenizer is written.

Options: ``tie_word_embeddings``; ``llama3_rope`` (Llama-3 rope scaling with
original_max_position_embeddings 64, so it matters at short lengths);
``max_shard_size`` (e.g. "40KB": sharded files + model.safetensors.index.json);
``fused_experts`` (MoE: save the transformers-5 fused 3-D expert layout instead
of the per-expert layout hub checkpoints use); ``**overrides`` for config fields.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")

_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)


def tiny_hf_config(arch: str, *, tie_word_embeddings: bool = False, llama3_rope: bool = False,
                   **overrides: Any):
    """The transformers config object of a tiny ``arch`` model (see ARCHITECTURES)."""
    import transformers as tf

    kw: dict[str, Any] = dict(_COMMON, tie_word_embeddings=tie_word_embeddings)
    if arch == "llama":
        cls = tf.LlamaConfig
    elif arch == "mistral":
        cls, kw["sliding_window"] = tf.MistralConfig, None
    elif arch == "qwen2":
        cls = tf.Qwen2Config
    elif arch == "qwen3":
        cls, kw["head_dim"] = tf.Qwen3Config, 16
    elif arch == "mixtral":
        cls, kw["num_local_experts"], kw["num_experts_per_tok"] = tf.MixtralConfig, 4, 2
    elif arch == "qwen2_moe":
        # layer 0 MoE with a shared expert, layer 1 a dense MLP (mlp_only_layers)
        cls = tf.Qwen2MoeConfig
        kw.update(_MOE, num_experts=4, shared_expert_intermediate_size=48, mlp_only_layers=[1],
                  norm_topk_prob=False)
    elif arch == "qwen3_moe":
        cls = tf.Qwen3MoeConfig
        kw.update(_MOE, num_experts=4, head_dim=16, norm_topk_prob=True)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")
    if llama3_rope:
        kw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}
    kw.update(overrides)
    return cls(**kw)


def make_tiny_checkpoint(arch: str, path: "str | os.PathLike[str]", *, seed: int = 0,
                         tie_word_embeddings: bool = False, llama3_rope: bool = False,
                         max_shard_size: Optional[str] = None, fused_experts: bool = False,
                         **overrides: Any) -> str:
    """Writes a tiny random ``arch`` model to ``path`` with ``save_pretrained``; returns the path."""
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(arch, tie_word_embeddings=tie_word_embeddings,
                            llama3_rope=llama3_rope, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = os.fspath(path)
    kwargs: dict[str, Any] = {"save_original_format": not fused_experts}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return path


def load_hf_model(path: "str | os.PathLike[str]"):
    """The HF reference model for a checkpoint: fp32, eval mode, eager attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.fspath(path), dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval()
