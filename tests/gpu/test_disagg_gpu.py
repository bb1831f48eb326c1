"""Disaggregated prefill/decode between two Ray actors, each with its own engine and device.

The prefill actor computes prompts and sends their KV over an NCCL pair (CuPy) to
the decode actor, which continues decoding; greedy tokens must equal a colocated
engine's, token for token. The same code runs on CPU over gloo as a fallback test.
"""

from __future__ import annotations

import random

import pytest

from engine import SamplingParams

ENGINE_KW = dict(model="kvmesh-tiny", dtype="float32", block_size=16, num_blocks=128, max_model_len=512,
                 max_num_batched_tokens=64, attention_backend="torch_ref", enforce_eager=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


class _PrefillActor:
    def __init__(self, engine_kw: dict, transport: str) -> None:
        import torch

        from engine import AsyncLLM, EngineConfig
        from engine.executor import resolve_device
        from engine.kv_transfer.base import create_backend
        from engine.kv_transfer.connector import PrefillConnector
        config = EngineConfig.create(**engine_kw)
        self.engine = AsyncLLM.from_config(config)
        device = resolve_device(config)
        self.connector = PrefillConnector(self.engine, create_backend(transport, torch.device(device)), "p0")

    async def prefill(self, prompt, params, request_id, plan):
        output, timings = await self.connector.prefill(prompt, params, request_id, plan)
        return output.outputs[0].token_ids, output.finished, timings

    async def stats(self):
        import asyncio
        while self.connector.num_sends_in_flight:
            await asyncio.sleep(0.01)
        return self.connector.sender.stats


class _DecodeActor:
    def __init__(self, engine_kw: dict, transport: str) -> None:
        import torch

        from engine import AsyncLLM, EngineConfig
        from engine.executor import resolve_device
        from engine.kv_transfer.base import create_backend
        from engine.kv_transfer.connector import DecodeConnector
        from engine.kv_transfer.mailbox import RayMailbox
        config = EngineConfig.create(**engine_kw)
        self.engine = AsyncLLM.from_config(config)
        self.backend = create_backend(transport, torch.device(resolve_device(config)))
        self.connector = DecodeConnector(self.engine, self.backend, RayMailbox.create(), "d0")
        self.streams = {}

    async def use_channel_mailbox(self):
        """The serving path's mailbox (router/kv_mailbox.py) instead of the Ray actor."""
        from engine.kv_transfer.connector import DecodeConnector
        from router.kv_mailbox import ChannelMailbox
        self.connector = DecodeConnector(self.engine, self.backend, await ChannelMailbox.create(), "d0")

    async def reserve(self, prompt, params, request_id):
        self.connector.start()
        stream = self.connector.generate(prompt, params, request_id, lease_timeout_s=60.0)
        plan = await stream.__anext__()
        self.streams[request_id] = stream
        return plan

    async def finish(self, request_id):
        last = None
        async for out in self.streams.pop(request_id):
            last = out
        return last.outputs[0].token_ids, last.metrics.kv_transfer_bytes

    def stats(self):
        s = self.engine.get_stats()
        return self.connector.receiver.stats, s.num_free_blocks, s.num_blocks


def colocated_tokens(engine_kw: dict, prompts: list[list[int]]) -> list[list[int]]:
    from engine import LLM
    llm = LLM(**engine_kw)
    return [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]  # one at a time


def run_pair(ray, transport: str, device: str, num_gpus: float, channel_mailbox: bool = False,
             **engine_kw) -> None:
    kw = dict(ENGINE_KW, device=device, **engine_kw)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 500) for _ in range(n)] for n in (7, 33, 100, 250)]
    shared = prompts[2][:64]
    prompts.append(shared + [1, 2, 3])  # hits the shared prefix on both sides
    opts = {"num_gpus": num_gpus, "num_cpus": 0.1}
    prefill = ray.remote(**opts)(_PrefillActor).remote(kw, transport)
    decode = ray.remote(**opts)(_DecodeActor).remote(kw, transport)
    if channel_mailbox:
        ray.get(decode.use_channel_mailbox.remote())
    try:
        got = []
        for i, prompt in enumerate(prompts):
            plan = ray.get(decode.reserve.remote(prompt, GREEDY, f"r{i}"))
            assert plan is not None
            if i == len(prompts) - 1:
                assert plan.reservation.first_block_index == 4  # the decode side had 4 shared blocks
            first, finished, _ = ray.get(prefill.prefill.remote(prompt, GREEDY, f"r{i}", plan))
            assert len(first) == 1 and not finished
            tokens, num_bytes = ray.get(decode.finish.remote(f"r{i}"))
            assert tokens[0] == first[0] and num_bytes > 0
            got.append(tokens)
        sender = ray.get(prefill.stats.remote())
        receiver, num_free, num_blocks = ray.get(decode.stats.remote())
        assert sender.num_transfers == receiver.num_transfers == len(prompts)
        assert sender.num_failures == receiver.num_failures == 0
        assert num_free == num_blocks  # no block left referenced on the decode side
    finally:
        ray.kill(prefill)
        ray.kill(decode)
    assert got == colocated_tokens(kw, prompts)


@pytest.mark.multigpu
def test_nccl_disaggregated_equals_colocated(ray_cluster):
    import torch
    assert torch.cuda.device_count() >= 2
    run_pair(ray_cluster, "nccl", "cuda", num_gpus=1)


def test_gloo_actor_pair_equals_colocated(ray_cluster):
    run_pair(ray_cluster, "gloo", "cpu", num_gpus=0)


@pytest.mark.gpu
def test_one_gpu_triton_graphs_channel_mailbox_equals_colocated(ray_cluster):
    """Both engines on one GPU (Triton kernels, CUDA graphs, the stacked KV cache's one-launch
    gather and scatter), headers over the channel mailbox, bytes over gloo through the host."""
    import torch
    assert torch.cuda.device_count() >= 1
    run_pair(ray_cluster, "gloo", "cuda", num_gpus=0.5, channel_mailbox=True,
             attention_backend="triton", enforce_eager=False)
