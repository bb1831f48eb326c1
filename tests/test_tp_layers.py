"""Which row-parallel layers hand their partial sums to ``Communicator.linear_for_reduce``.

On GPUs that is the GEMV that also pushes its outputs to the peers for the LL all-reduce
(engine/distributed/ll_allreduce.py), so it may only be used where the group's very next
reduction takes the output unchanged: a dense decoder's o_proj and down_proj (the next norm or
stage hand-off reduces them), never an MoE block's shared expert (added to the experts'
output first). A recording stand-in for the group checks the layers' side of that contract on
the CPU; the kernel and the LL side are checked on GPUs (tests/gpu/test_ll_allreduce.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.distributed.communicator import Communicator
from engine.models.layers import RowParallelLinear
from engine.models.registry import get_model_class
from engine.models.spec import ModelSpec
from tests.hf_checkpoints import tiny_hf_config


class RecordingGroup(Communicator):
    """Rank 0 of a stand-in TP group of 2: records ``linear_for_reduce`` calls and answers
    them with a marked result (+1000), or with None when ``has_kernel`` is False."""

    rank, world_size = 0, 2

    def __init__(self, has_kernel: bool = True) -> None:
        self.has_kernel = has_kernel
        self.calls: list[tuple[int, ...]] = []

    def linear_for_reduce(self, x, weight):
        self.calls.append(tuple(x.shape))
        return x @ weight.T + 1000 if self.has_kernel else None

    def all_reduce(self, tensor):
        return tensor

    def all_gather(self, tensor, dim):
        raise AssertionError("not used here")

    def send(self, tensor, dst):
        raise AssertionError("not used here")

    def recv(self, shape, dtype, src):
        raise AssertionError("not used here")

    @property
    def device(self):
        return torch.device("cpu")


def build(arch: str, tp_size: int):
    config = tiny_hf_config(arch)
    spec = ModelSpec.from_hf_config(config.to_dict() | {"architectures": config.architectures
                                                        or [type(config).__name__.replace("Config", "ForCausalLM")]})
    return get_model_class(spec.architecture)(spec, tp_rank=0, tp_size=tp_size,
                                              comm=RecordingGroup() if tp_size > 1 else None)


def test_dense_decoder_sends_o_proj_and_down_proj():
    model = build("llama", tp_size=2)
    for layer in model.model.layers:
        assert layer.self_attn.o_proj.send_partial and layer.mlp.down_proj.send_partial
    model = build("llama", tp_size=1)
    assert not any(m.send_partial for m in model.modules() if isinstance(m, RowParallelLinear))


def test_moe_shared_expert_never_sends_but_a_dense_layer_does():
    model = build("qwen2_moe", tp_size=2)  # layer 0: MoE with a shared expert; layer 1: dense
    moe_layer, dense_layer = model.model.layers
    assert not moe_layer.mlp.shared_expert.down_proj.send_partial
    assert moe_layer.self_attn.o_proj.send_partial
    assert dense_layer.mlp.down_proj.send_partial


def test_row_parallel_forward_takes_the_sending_kernel_for_one_row_only():
    torch.manual_seed(0)
    group = RecordingGroup()
    layer = RowParallelLinear(8, 6, tp_rank=0, tp_size=2, comm=group, reduce_results=False,
                              send_partial=True)
    layer.weight.data.normal_()
    one, three = torch.randn(1, 4), torch.randn(3, 4)
    torch.testing.assert_close(layer(one), F.linear(one, layer.weight) + 1000)
    torch.testing.assert_close(layer(three), F.linear(three, layer.weight))  # prefill: plain
    assert group.calls == [(1, 4)]
    group.has_kernel = False  # no such kernel for the shape: the layer's own linear
    torch.testing.assert_close(layer(one), F.linear(one, layer.weight))
    assert group.calls == [(1, 4), (1, 4)]


def test_send_partial_needs_a_partial_output():
    group = RecordingGroup()
    for kwargs in ({"reduce_results": True}, {"reduce_results": False, "bias": True}):
        layer = RowParallelLinear(8, 6, tp_rank=0, tp_size=2, comm=group, send_partial=True, **kwargs)
        assert not layer.send_partial, kwargs
