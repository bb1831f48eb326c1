"""What the prefill side, the decode side and the router exchange about one KV transfer.

Plain Python, no torch, no Ray: these small dataclasses cross process boundaries
(pickled by Ray) and are tested with plain objects.

Life of a disaggregated request (one prompt, n == 1)::

    router ──reserve──▶ decode engine: prefix lookup, allocate blocks for the prompt,
                        hold them under a lease ──▶ KVReservation (dst block ids)
    router ──KVTransferPlan──▶ prefill engine: compute the prompt (chunked, prefix
                        cache), sample the first token, gather the prompt's blocks
                        from ``first_block_index`` on into one staging tensor, free them
    prefill ──KVTransferHeader (control, through the decode side's mailbox)──▶ decode
    prefill ══KV bytes (pair communicator: gloo / NCCL)══▶ decode staging tensor
    decode engine: scatter into the reserved blocks, append the first token, run

Block index layout of one prompt of 5 blocks whose first 2 the decode side had
cached (its own prefix cache)::

    logical block    0    1  | 2    3    4 (partial)
    decode side     hit  hit | reserved: dst_block_ids = [d2, d3, d4]
    prefill side    any  any | sent:     its block_ids[2:5]      first_block_index = 2
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional


class KVTransferRole(str, enum.Enum):
    """How a request takes part in disaggregated serving (``Request.kv_role``)."""

    EXPORT = "export"  # prefill only: compute the prompt, sample one token, export the blocks
    IMPORT = "import"  # remote prefill: reserve blocks under a lease, run when the KV arrives


class TransferFailurePolicy(str, enum.Enum):
    """What the decode side does when the KV does not arrive (lease expired, transfer error)."""

    RECOMPUTE = "recompute"  # free the reserved blocks and compute the prompt locally
    FAIL = "fail"  # free the reserved blocks and finish the request with an error


@dataclass(frozen=True)
class KVEndpoint:
    """Where a decode replica receives KV: its id and its control mailbox (a picklable handle)."""

    endpoint_id: str
    mailbox: Any  # engine.kv_transfer.mailbox.Mailbox
    tp_size: int = 1  # ranks of the decode replica; rank i receives from prefill rank i


@dataclass(frozen=True)
class KVReservation:
    """The decode side's answer to ``reserve``: the blocks it holds for the prompt's KV."""

    request_id: str
    transfer_id: str
    first_block_index: int  # leading prompt blocks the decode side already has (prefix hits)
    dst_block_ids: tuple[int, ...]  # blocks the sender fills, in logical order
    num_prompt_tokens: int
    lease_timeout_s: float

    @property
    def num_blocks(self) -> int:
        return len(self.dst_block_ids)


@dataclass(frozen=True)
class DeferredPlan:
    """A prefill whose plan comes after it (the reservation ran alongside the prefill): the
    prefill side exports every prompt block and sends from the plan's first block once the
    plan is delivered (``PrefillConnector.deliver_plan``)."""

    request_id: str


@dataclass(frozen=True)
class KVTransferPlan:
    """What the prefill side needs to send one request's KV: reservation + destination."""

    reservation: KVReservation
    endpoint: KVEndpoint

    @property
    def request_id(self) -> str:
        return self.reservation.request_id

    @property
    def transfer_id(self) -> str:
        return self.reservation.transfer_id


@dataclass(frozen=True)
class KVTransferHeader:
    """Control message sent ahead of the bytes: which request, shape, and the first token.

    ``shape`` is the staging tensor's ``(num_layers, 2, num_blocks, block_size,
    num_kv_heads, head_dim)`` of one rank; ``dtype`` its torch dtype name.
    """

    request_id: str
    transfer_id: str
    pair_id: str  # the (sender, receiver) communicator these bytes travel on
    tp_rank: int
    shape: tuple[int, ...]
    dtype: str
    first_token_id: int
    first_token_logprobs: Any = None  # engine.scheduler_output.TokenLogprobs or None
    sent_at: float = 0.0  # sender's time.time() when the header left

    @property
    def num_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class PairRendezvous:
    """Control message that creates a pair communicator (sent once per pair, then reused)."""

    pair_id: str
    tp_rank: int
    info: Any  # backend-specific: gloo (host, port); NCCL unique id


@dataclass
class KVTransferStats:
    """Totals of one side's transfers (exported as metrics)."""

    num_transfers: int = 0
    num_failures: int = 0
    num_bytes: int = 0
    seconds: float = 0.0

    def add(self, num_bytes: int, seconds: float) -> None:
        self.num_transfers += 1
        self.num_bytes += num_bytes
        self.seconds += seconds


@dataclass
class PrefillTimings:
    """Where the prefill side's time went for one request (seconds, engine clock)."""

    queue_s: float = 0.0  # added to the engine -> first scheduled
    prefill_s: float = 0.0  # first scheduled -> first token sampled
    num_cached_tokens: int = 0  # prompt tokens found in the prefill side's prefix cache


def new_transfer_id() -> str:
    return uuid.uuid4().hex


@dataclass
class KVArrival:
    """The decode side got a request's KV (or failed to); delivered to the engine thread."""

    header: KVTransferHeader
    kv: Any = None  # torch.Tensor in the staging layout, None on failure
    error: Optional[str] = None
    transfer_s: float = 0.0
    num_bytes: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class KVExport:
    """The prefill side's staged KV of one request, ready to send (``kv``: torch.Tensor)."""

    plan: "KVTransferPlan | DeferredPlan"  # deferred: kv holds every prompt block
    kv: Any  # (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim), see blocks.py
    first_token_id: int
    first_token_logprobs: Any = None  # engine.scheduler_output.TokenLogprobs or None
