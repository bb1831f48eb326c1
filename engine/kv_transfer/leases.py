"""The scheduler's side of disaggregated serving: reserved blocks under leases, and exports.

Plain Python, no torch. Two request flags (``Request.kv_role``):

* ``IMPORT`` (decode replica, "remote prefill"): ``reserve`` looks up the prompt
  in the prefix cache and allocates blocks for the rest of the prompt at once.
  The request leaves the waiting queue and holds those blocks in
  ``WAITING_FOR_KV`` until ``admit`` (its KV arrived: the prompt counts as
  computed, the first token sampled by the prefill side is appended, and it
  runs like any request) or ``release`` (lease expired or transfer failed: the
  blocks are freed and it is either queued to compute its prompt here, or
  failed). A request waiting for KV counts against ``max_num_seqs``.
* ``EXPORT`` (prefill replica, "prefill only"): an ordinary request until its
  first token is sampled; then ``take_exports`` hands it to the engine, which
  gathers its prompt blocks and finishes it (``FinishReason.TRANSFERRED``)
  in the same step, so it is never scheduled for decode.

Invariant: a lease's blocks are referenced only by its request; an arrival for
a lease that is gone (expired, aborted, replaced) is dropped by the engine
without touching any block.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from engine.kv_transfer.plan import KVReservation, KVTransferRole, TransferFailurePolicy, new_transfer_id
from engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from engine.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass
class KVLease:
    request: Request
    reservation: KVReservation
    deadline: float  # time.monotonic() after which the blocks are taken back
    on_failure: TransferFailurePolicy


class RemoteKVManager:
    def __init__(self, scheduler: "Scheduler") -> None:
        self.scheduler = scheduler
        self.leases: dict[str, KVLease] = {}  # request id -> lease, while WAITING_FOR_KV
        self.num_reserved = 0  # totals since start
        self.num_admitted = 0
        self.num_released = 0

    @property
    def num_waiting_for_kv(self) -> int:
        return len(self.leases)

    # ---- decode side ----------------------------------------------------------------------------
    def reserve(self, request: Request, lease_timeout_s: float, min_remote_tokens: int,
                on_failure: TransferFailurePolicy) -> Optional[KVReservation]:
        """Moves a queued request to WAITING_FOR_KV with blocks for its prompt.

        Returns None, leaving the request queued to be computed here, when fewer
        than ``min_remote_tokens`` prompt tokens are uncached, all seats
        (``max_num_seqs``) are taken, or the pool has too few free blocks.
        """
        sched = self.scheduler
        manager = sched.kv_cache_manager
        if request.status is not RequestStatus.WAITING or request.block_ids or request.num_output_tokens:
            raise ValueError(f"request {request.request_id} cannot reserve blocks now")
        if sched.num_running + self.num_waiting_for_kv >= sched.config.max_num_seqs:
            return None
        hit_blocks, num_hit_tokens = manager.get_computed_blocks(request)
        num_remote = request.num_prompt_tokens - num_hit_tokens
        if num_remote < max(1, min_remote_tokens):
            return None
        copies = manager.allocate_slots(request, num_remote, hit_blocks)
        if copies is None:
            return None
        assert not copies, "fresh blocks after full prefix hits are never shared"
        sched.waiting.remove(request)
        request.num_computed_tokens = num_hit_tokens
        request.num_cached_tokens = num_hit_tokens
        request.status = RequestStatus.WAITING_FOR_KV
        request.kv_role = KVTransferRole.IMPORT
        first = len(hit_blocks)
        reservation = KVReservation(request_id=request.request_id, transfer_id=new_transfer_id(),
                                    first_block_index=first, dst_block_ids=tuple(request.block_ids[first:]),
                                    num_prompt_tokens=request.num_prompt_tokens,
                                    lease_timeout_s=lease_timeout_s)
        self.leases[request.request_id] = KVLease(request, reservation, time.monotonic() + lease_timeout_s,
                                                  on_failure)
        self.num_reserved += 1
        return reservation

    def get(self, request_id: str, transfer_id: str) -> Optional[KVLease]:
        """The live lease of this transfer, or None (expired, aborted, or another transfer)."""
        lease = self.leases.get(request_id)
        if lease is None or lease.reservation.transfer_id != transfer_id:
            return None
        return lease

    def admit(self, request_id: str, first_token_id: int) -> Request:
        """The KV is in the reserved blocks: the prompt is computed, the first token appended.

        The request runs from the next step on, or is finished here if the first
        token already stops it (the caller reports it like any update).
        """
        sched = self.scheduler
        lease = self.leases.pop(request_id)
        request = lease.request
        request.num_computed_tokens = request.num_prompt_tokens
        request.status = RequestStatus.RUNNING
        sched._add_running(request)
        sched.kv_cache_manager.cache_blocks(request, request.num_computed_tokens)
        request.append_output_token(first_token_id)
        reason = sched._check_stop(request)
        if reason is not None:
            sched.finish_requests(request_id, reason)
        self.num_admitted += 1
        return request

    def release(self, request_id: str) -> Optional[KVLease]:
        """Frees a lease's blocks (lease expired or transfer failed).

        The request goes back to the front of the waiting queue as a plain request
        (it will compute its prompt here); under ``FAIL`` the caller finishes it
        with an error right away. Returns the lease, or None if it was gone.
        """
        sched = self.scheduler
        lease = self.leases.pop(request_id, None)
        if lease is None:
            return None
        request = lease.request
        sched.kv_cache_manager.free(request)
        request.num_computed_tokens = 0
        request.num_cached_tokens = 0
        request.kv_role = None
        request.status = RequestStatus.WAITING
        sched.waiting.insert(0, request)
        self.num_released += 1
        return lease

    def expired(self, now: Optional[float] = None) -> list[str]:
        now = time.monotonic() if now is None else now
        return [rid for rid, lease in self.leases.items() if lease.deadline <= now]

    def drop(self, request: Request) -> None:
        """Forgets the lease of a request being finished (abort); the scheduler frees the blocks."""
        self.leases.pop(request.request_id, None)

    # ---- prefill side ---------------------------------------------------------------------------
    def take_exports(self) -> list[Request]:
        """Prefill-only requests that have sampled their first token and were not stopped by it."""
        return [r for r in self.scheduler.running
                if r.kv_role is KVTransferRole.EXPORT and r.num_output_tokens >= 1]
