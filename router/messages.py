"""Messages that cross Ray between the ingress, the request router and the replicas.

The ingress renders and tokenizes the prompt once, computes its block-hash
chain with the engine's block size (``engine.block_hash``), and sends a
``GenerateRequest`` through the replica deployment's handle. The request
router (inside that handle) reads ``block_hashes`` to pick a replica; the
replica streams back ``router.deltas.OutputDelta``s (``LLMServer.generate_deltas``:
only the tokens, text and logprobs new since the last item; ``generate`` still
streams cumulative ``engine.outputs.RequestOutput``s for direct handle users),
each naming the replica, which the ingress returns as the ``x-kvmesh-replica``
response header (routing is observable from outside). With ``stream_to`` set (the
ingress's ``router.stream_channel.StreamReceiver``), the deltas go over that direct
channel instead of Serve's stream, which then carries only the final ``ChannelEnd``.
Replicas publish ``ReplicaStats`` as their Serve routing stats (a plain dict).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from engine.sampling_params import SamplingParams
from router.stream_channel import ChannelAddress


@dataclass
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_hashes: list[int]  # hash chain of the prompt's full blocks
    prompt: Optional[str] = None  # rendered text, for echo/logging only
    priority: int = 0
    stream_to: Optional[ChannelAddress] = None  # None: deltas are Serve stream items

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class ReplicaOutput:
    replica_id: str  # Serve replica unique id of the replica that ran the request
    output: Any  # engine.outputs.RequestOutput (cumulative)


@dataclass
class ReplicaStats:
    num_waiting: int = 0  # queue depth: requests admitted but not yet running
    num_running: int = 0
    kv_usage: float = 0.0  # share of KV blocks in use
    prefix_cache_hit_rate: float = 0.0
    num_preemptions: int = 0
    cached_block_hashes: list[int] = field(default_factory=list)  # engine's prefix-cache content

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "ReplicaStats":
        if not data:
            return cls()
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
