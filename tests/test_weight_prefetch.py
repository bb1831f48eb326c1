"""Weight prefetch hints (engine/kernels/prefetch.py): which weight each norm names, and the
size policy. The kernels that act on them run on GPUs (tests/gpu/test_kernels.py, the LL
all-reduce's self-check); here: the wiring, which a wrong layer or a state_dict entry breaks.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import prefetch as weight_prefetch
from tests.hf_checkpoints import make_tiny_checkpoint
from tests.test_models import ours


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_each_norm_names_the_weight_that_reads_its_output(tmp_path, arch):
    model = ours(make_tiny_checkpoint(arch, tmp_path / arch))
    for layer in model.model.layers:
        assert layer.input_layernorm._next == (layer.self_attn.qkv_proj,)
        gate_up = getattr(layer.mlp, "gate_up_proj", None)  # MoE blocks: no single next weight
        assert layer.post_attention_layernorm._next == ((gate_up,) if gate_up is not None else ())
    assert model.model.norm._next == (model.lm_head,)
    # a hint, not a submodule: no parameter appears twice or under a new name
    names = [name for name, _ in model.named_parameters()]
    assert not [n for n in names if "_next" in n] and len(names) == len(set(names))


def test_size_policy(monkeypatch):
    monkeypatch.delenv(weight_prefetch.PREFETCH_ENV, raising=False)
    assert weight_prefetch.max_bytes() == 16 << 20
    monkeypatch.setenv(weight_prefetch.PREFETCH_ENV, "0")
    assert weight_prefetch.max_bytes() == 0
    monkeypatch.setenv(weight_prefetch.PREFETCH_ENV, "sixteen")
    with pytest.raises(ValueError, match="KVMESH_WEIGHT_PREFETCH_MB must be a number"):
        weight_prefetch.max_bytes()
    monkeypatch.setenv(weight_prefetch.PREFETCH_ENV, "16")
    assert weight_prefetch.plan(torch.empty(64, 64), rows=1) == (0, 0)  # CPU: nothing to do
    assert weight_prefetch.plan(None, rows=1) == (0, 0)
