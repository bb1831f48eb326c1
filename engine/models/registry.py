"""Architecture -> model class.

Every class follows one contract (``LlamaForCausalLM`` documents it)::

    model = cls(spec, tp_rank=0, tp_size=1, comm=None)
    hidden = model(input_ids (T,), positions (T,), ctx: ForwardContext)    # (T, hidden_size)
    logits = model.compute_logits(hidden (R, hidden_size))                 # (R, vocab) fp32
    model.load_weights(iterable of (hf_name, full tensor))
    model.num_layers, model.num_kv_heads (per rank), model.head_dim, model.spec
"""

from __future__ import annotations

from torch import nn

from engine.models.llama import LlamaForCausalLM
from engine.models.moe import MoEForCausalLM
from engine.models.spec import Architecture

MODEL_CLASSES: dict[Architecture, type[nn.Module]] = {
    Architecture.LLAMA: LlamaForCausalLM,
    Architecture.MISTRAL: LlamaForCausalLM,  # sliding window ignored: full attention everywhere
    Architecture.QWEN2: LlamaForCausalLM,  # q/k/v bias via spec.qkv_bias
    Architecture.QWEN3: LlamaForCausalLM,  # q/k norm via spec.qk_norm
    Architecture.MIXTRAL: MoEForCausalLM,
    Architecture.QWEN2_MOE: MoEForCausalLM,
    Architecture.QWEN3_MOE: MoEForCausalLM,
}


def get_model_class(architecture: Architecture) -> type[nn.Module]:
    try:
        return MODEL_CLASSES[Architecture(architecture)]
    except (KeyError, ValueError):
        raise ValueError(f"no model class for architecture {architecture!r}; supported: "
                         f"{', '.join(a.value for a in MODEL_CLASSES)}") from None
