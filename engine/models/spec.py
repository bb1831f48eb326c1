"""What the engine needs to know about a model, read once from its HF ``config.json``.

``ModelSpec.from_hf_config(path_or_dict)`` turns the loosely-typed HF config into
a frozen, validated ``ModelSpec``. Everything model-specific the engine does
(which classes to build, KV cache shapes, max length, eos ids) reads this spec,
never the raw JSON. Differences between model families become typed fields:

    Llama 2/3, Mistral  plain decoder (Llama 3.x: ``rope_scaling`` of type llama3)
    Qwen2               + bias on q/k/v
    Qwen3               + per-head RMSNorm on q and k, explicit head_dim
    Mixtral             MoE MLP in every layer (top-k always renormalised)
    Qwen2-MoE           MoE + a shared expert behind a sigmoid gate; dense layers by config
    Qwen3-MoE           MoE + q/k norm; ``norm_topk_prob`` decides renormalisation

transformers 5 writes rope settings as ``rope_parameters`` (with ``rope_theta``
inside); older configs have top-level ``rope_theta`` and ``rope_scaling``. Both
are read. Sliding-window settings are ignored (every layer attends fully).
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass
from typing import Any, Optional


class Architecture(str, enum.Enum):
    """Supported model families; values are the HF ``architectures`` names."""

    LLAMA = "LlamaForCausalLM"
    MISTRAL = "MistralForCausalLM"
    QWEN2 = "Qwen2ForCausalLM"
    QWEN3 = "Qwen3ForCausalLM"
    MIXTRAL = "MixtralForCausalLM"
    QWEN2_MOE = "Qwen2MoeForCausalLM"
    QWEN3_MOE = "Qwen3MoeForCausalLM"

    @property
    def is_moe(self) -> bool:
        return self in (Architecture.MIXTRAL, Architecture.QWEN2_MOE, Architecture.QWEN3_MOE)


SUPPORTED_ARCHITECTURES = tuple(a.value for a in Architecture)


class RopeType(str, enum.Enum):
    DEFAULT = "default"  # plain RoPE: inv_freq = theta ** (-2i / head_dim)
    LLAMA3 = "llama3"  # Llama 3.1+: low frequencies divided by ``factor``, smooth in between


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (the only scaled RoPE we support)."""

    rope_type: RopeType
    factor: float  # divides the lowest frequencies (8 in Llama 3.1)
    low_freq_factor: float  # wavelengths above original_max / low_freq_factor are divided by factor
    high_freq_factor: float  # wavelengths below original_max / high_freq_factor are kept
    original_max_position_embeddings: int  # context length of pre-training

    def __post_init__(self) -> None:
        _check(self.factor > 0, f"rope_scaling.factor must be > 0, got {self.factor}")
        _check(self.high_freq_factor > self.low_freq_factor,
               f"rope_scaling needs high_freq_factor > low_freq_factor, got "
               f"{self.high_freq_factor} <= {self.low_freq_factor}")
        _check(self.original_max_position_embeddings > 0,
               "rope_scaling.original_max_position_embeddings must be > 0")


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int  # experts per token
    moe_intermediate_size: int  # hidden size of one routed expert's MLP
    norm_topk_prob: bool  # renormalise the top-k router probabilities to sum to 1
    shared_expert_intermediate_size: Optional[int] = None  # Qwen2-MoE: always-on expert
    decoder_sparse_step: int = 1  # layer i is MoE iff (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here (then dense MLP)

    def __post_init__(self) -> None:
        _check(self.num_experts > 0, f"num_experts must be > 0, got {self.num_experts}")
        _check(0 < self.top_k <= self.num_experts,
               f"num_experts_per_tok must be in 1..{self.num_experts}, got {self.top_k}")
        _check(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0")
        _check(self.decoder_sparse_step >= 1, "decoder_sparse_step must be >= 1")

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0


@dataclass(frozen=True)
class ModelSpec:
    architecture: Architecture
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
    head_dim: int
    intermediate_size: int  # dense MLP width (MoE models: dense layers only; Mixtral: per expert)
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[RopeScaling]  # None: plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool  # lm_head shares the embedding matrix
    qkv_bias: bool  # bias on q/k/v projections (Qwen2, Qwen2-MoE)
    o_proj_bias: bool  # bias on the output projection (Llama with attention_bias)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3, Qwen3-MoE)
    moe: Optional[MoESpec]  # None: dense model
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: Optional[int] = None
    torch_dtype: Optional[str] = None  # dtype the checkpoint was saved in, e.g. "bfloat16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "architecture", Architecture(self.architecture))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _check(self.num_heads % self.num_kv_heads == 0,
               f"num_attention_heads ({self.num_heads}) must be a multiple of "
               f"num_key_value_heads ({self.num_kv_heads})")
        _check(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        _check(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        _check(self.architecture.is_moe == (self.moe is not None),
               f"{self.architecture.value} {'needs' if self.architecture.is_moe else 'takes no'} MoESpec")

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @classmethod
    def from_hf_config(cls, path_or_dict: "str | os.PathLike[str] | dict[str, Any]") -> "ModelSpec":
        """Read a HF config: a model folder, a path to ``config.json``, or the parsed dict."""
        cfg = path_or_dict if isinstance(path_or_dict, dict) else _read_config_json(path_or_dict)
        return _spec_from_dict(cfg)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _read_config_json(path: "str | os.PathLike[str]") -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"model path {path!r} does not exist (expected a local HF model folder)")
    config_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(config_path):
        raise ValueError(f"no config.json in model folder {path!r}")
    try:
        with open(config_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed {config_path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"malformed {config_path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _parse_architecture(cfg: dict[str, Any]) -> Architecture:
    names = cfg.get("architectures") or []
    if isinstance(names, str):
        names = [names]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return Architecture(name)
    found = ", ".join(names) if names else f"none (model_type {cfg.get('model_type')!r})"
    raise ValueError(f"unsupported architecture: {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _require(cfg: dict[str, Any], key: str, arch: Architecture) -> Any:
    if cfg.get(key) is None:
        raise ValueError(f"config.json of {arch.value} is missing required field {key!r}")
    return cfg[key]


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, Optional[RopeScaling]]:
    # transformers 5: rope_parameters = {"rope_type", "rope_theta", ...scaling keys};
    # transformers 4: rope_theta at top level, rope_scaling = {"rope_type" | "type", ...} or null.
    params: dict[str, Any] = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == RopeType.DEFAULT.value:
        return float(theta), None
    if rope_type != RopeType.LLAMA3.value:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: "
                         f"{', '.join(t.value for t in RopeType)}")
    try:
        scaling = RopeScaling(
            rope_type=RopeType.LLAMA3,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ValueError(f"llama3 rope scaling is missing field {e.args[0]!r}") from None
    return float(theta), scaling


def _parse_moe(cfg: dict[str, Any], arch: Architecture) -> Optional[MoESpec]:
    if not arch.is_moe:
        return None
    # Qwen3-MoE hub configs say num_experts; transformers 5 writes num_local_experts.
    num_experts = cfg.get("num_local_experts") if arch == Architecture.MIXTRAL else \
        cfg.get("num_experts", cfg.get("num_local_experts"))
    if num_experts is None:
        raise ValueError(f"config.json of {arch.value} is missing required field 'num_experts'")
    top_k = _require(cfg, "num_experts_per_tok", arch)
    if arch == Architecture.MIXTRAL:
        # Mixtral's experts are intermediate_size wide and always renormalise the top-k.
        return MoESpec(num_experts=int(num_experts), top_k=int(top_k),
                       moe_intermediate_size=int(_require(cfg, "intermediate_size", arch)),
                       norm_topk_prob=True)
    shared = cfg.get("shared_expert_intermediate_size") if arch == Architecture.QWEN2_MOE else None
    return MoESpec(
        num_experts=int(num_experts), top_k=int(top_k),
        moe_intermediate_size=int(_require(cfg, "moe_intermediate_size", arch)),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(shared) if shared else None,
        decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _spec_from_dict(cfg: dict[str, Any]) -> ModelSpec:
    arch = _parse_architecture(cfg)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r} for {arch.value}; only 'silu' is supported")
    hidden_size = int(_require(cfg, "hidden_size", arch))
    num_heads = int(_require(cfg, "num_attention_heads", arch))
    num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if num_heads <= 0 or hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                             f"({num_heads}) when head_dim is not given")
        head_dim = hidden_size // num_heads
    if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of "
                         f"num_key_value_heads ({num_kv_heads})")
    rope_theta, rope_scaling = _parse_rope(cfg)
    moe = _parse_moe(cfg, arch)
    attention_bias = bool(cfg.get("attention_bias", False))
    if arch == Architecture.QWEN2:
        qkv_bias, o_proj_bias = True, False  # Qwen2 hard-codes bias on q/k/v only
    elif arch == Architecture.QWEN2_MOE:
        qkv_bias, o_proj_bias = bool(cfg.get("qkv_bias", True)), False
    else:
        qkv_bias = o_proj_bias = attention_bias
    if cfg.get("mlp_bias"):
        raise ValueError(f"mlp_bias=true is not supported for {arch.value}")
    intermediate = cfg.get("intermediate_size")
    if intermediate is None and moe is not None:
        intermediate = moe.moe_intermediate_size  # no dense layers need it
    return ModelSpec(
        architecture=arch,
        vocab_size=int(_require(cfg, "vocab_size", arch)),
        hidden_size=hidden_size,
        num_layers=int(_require(cfg, "num_hidden_layers", arch)),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=int(head_dim),
        intermediate_size=int(intermediate if intermediate is not None
                              else _require(cfg, "intermediate_size", arch)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_proj_bias=o_proj_bias,
        qk_norm=arch in (Architecture.QWEN3, Architecture.QWEN3_MOE),
        moe=moe,
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        bos_token_id=cfg.get("bos_token_id"),
        torch_dtype=_dtype_name(cfg.get("dtype", cfg.get("torch_dtype"))),
    )


def _dtype_name(value: Any) -> Optional[str]:
    if value is None:
        return None
    return str(value).removeprefix("torch.")
