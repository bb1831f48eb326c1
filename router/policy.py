"""Prefix-affinity routing policy: which replica should serve a request.

Plain Python (no torch, no ray). The request router feeds it one ``ReplicaView``
per candidate replica (its load and how many leading blocks of the request's
block-hash chain it already caches) and gets back a ``RoutingDecision``: every
candidate ranked best first, plus the rule that decided. With the defaults:

- **Affinity.** A replica matching at least ``min_match_blocks`` (1) leading
  blocks, and at least ``min_match_ratio`` (1/8) of the request's blocks, is
  preferred by ``score = matched_blocks - load_weight * load``
  (``load_weight`` 4.0: one unit of load costs as much as 4 cached blocks).
  The ratio keeps a chat template's header (the first block or two, the same
  in every chat) from making the first replica that saw it the owner of every
  prompt: such prompts are cold and spread.
- **Imbalance guard.** If the best-scoring prefix owner's load exceeds the least
  loaded replica's by more than ``imbalance_threshold`` (8.0 load units), the
  owner is flooded: rank by load instead (``LOAD_OVERRIDE``).
- **Cold prompts.** Without a usable match, sample two replicas with ``rng``
  and take the less loaded (``FALLBACK_P2C``); ties go to the replica caching
  fewer blocks, so distinct cold prefixes spread over replicas.
- **Load** of a replica is ``max(inflight_requests, queue_depth + running) +
  inflight_tokens / inflight_tokens_per_load_unit`` (4096): requests in flight
  counted at dispatch, corrected by the replica's own report, plus prompt size.
  If every replica's load reaches ``max_load_per_replica`` (off by default),
  the decision is ``SATURATED`` so the ingress may answer 429.

The decode pool of a disaggregated deployment uses ``choose_decode`` instead:
its replicas receive a prompt's KV into blocks reserved up front, so a replica
without enough free blocks would have to compute the prompt itself (exactly
the long prefill that disaggregation keeps off decode replicas). Each
``DecodeReplicaView`` carries the replica's load and its estimated free KV
blocks (``FreeBlockLedger``: last report minus blocks routed there since):

- **Room.** Replicas with at least the prompt's block need free (or not
  reported yet) are ranked by load, ties to more free blocks (``KV_ROOM``);
  the replicas short of blocks follow, by load, for Serve's fallback.
- **All short.** If no replica has room, all are ranked by load, ties to more
  free blocks (``KV_SHORT``): the chosen one computes the prompt itself or
  waits for blocks, as before.
"""

from __future__ import annotations

import enum
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence


class RoutingPolicyKind(enum.Enum):
    PREFIX_AFFINITY = "prefix_affinity"  # the policy described above
    POWER_OF_TWO = "power_of_two"  # ignore prefixes: P2C on load only


class DecisionKind(enum.Enum):
    AFFINITY = "affinity"  # best prefix match, load acceptable
    LOAD_OVERRIDE = "load_override"  # prefix owner flooded: least loaded wins
    FALLBACK_P2C = "fallback_p2c"  # cold prompt (or no block hashes): power of two choices
    SATURATED = "saturated"  # every replica at max_load_per_replica: ranked by load
    NO_REPLICAS = "no_replicas"
    KV_ROOM = "kv_room"  # decode pool: least loaded replica with free KV blocks for the prompt
    KV_SHORT = "kv_short"  # decode pool: no replica has the blocks: least loaded of all


@dataclass(frozen=True)
class RouterPolicyConfig:
    policy: RoutingPolicyKind = RoutingPolicyKind.PREFIX_AFFINITY
    min_match_blocks: int = 1  # fewer matched leading blocks than this is a cold prompt
    min_match_ratio: float = 0.125  # matched share of the request's blocks below this: cold
    load_weight: float = 4.0  # matched blocks one unit of load is worth in the score
    imbalance_threshold: float = 8.0  # owner load - min load above this: LOAD_OVERRIDE
    inflight_tokens_per_load_unit: int = 4096  # in-flight prompt tokens that make one load unit
    max_load_per_replica: Optional[float] = None  # all replicas at or above: SATURATED (429)
    index_capacity_blocks: int = 1_000_000  # block hashes the prefix index keeps (LRU)

    def __post_init__(self) -> None:
        if not isinstance(self.policy, RoutingPolicyKind):
            raise ValueError(f"policy must be a RoutingPolicyKind, got {self.policy!r}")
        if self.min_match_blocks < 1:
            raise ValueError(f"min_match_blocks must be >= 1, got {self.min_match_blocks}")
        if not 0.0 <= self.min_match_ratio <= 1.0:
            raise ValueError(f"min_match_ratio must be in [0, 1], got {self.min_match_ratio}")
        if self.load_weight < 0:
            raise ValueError(f"load_weight must be >= 0, got {self.load_weight}")
        if self.imbalance_threshold < 0:
            raise ValueError(f"imbalance_threshold must be >= 0, got {self.imbalance_threshold}")
        if self.inflight_tokens_per_load_unit < 1:
            raise ValueError("inflight_tokens_per_load_unit must be >= 1, "
                             f"got {self.inflight_tokens_per_load_unit}")
        if self.max_load_per_replica is not None and self.max_load_per_replica <= 0:
            raise ValueError(f"max_load_per_replica must be > 0, got {self.max_load_per_replica}")
        if self.index_capacity_blocks < 1:
            raise ValueError(f"index_capacity_blocks must be >= 1, got {self.index_capacity_blocks}")

    def to_dict(self) -> dict:
        """JSON-safe form, for ``RequestRouterConfig.request_router_kwargs``."""
        return {"policy": self.policy.value, "min_match_blocks": self.min_match_blocks,
                "min_match_ratio": self.min_match_ratio,
                "load_weight": self.load_weight, "imbalance_threshold": self.imbalance_threshold,
                "inflight_tokens_per_load_unit": self.inflight_tokens_per_load_unit,
                "max_load_per_replica": self.max_load_per_replica,
                "index_capacity_blocks": self.index_capacity_blocks}

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "RouterPolicyConfig":
        """Inverse of ``to_dict``; unknown keys raise ``ValueError``."""
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown router policy fields: {sorted(unknown)}")
        if "policy" in data and not isinstance(data["policy"], RoutingPolicyKind):
            data["policy"] = RoutingPolicyKind(data["policy"])
        return cls(**data)


@dataclass(frozen=True)
class ReplicaLoad:
    queue_depth: int = 0  # replica-reported waiting requests
    running: int = 0  # replica-reported running requests
    inflight_requests: int = 0  # dispatched by routers, not yet completed
    inflight_tokens: int = 0  # prompt tokens of those requests
    kv_usage: float = 0.0  # replica-reported share of KV blocks in use (informational)

    def units(self, cfg: RouterPolicyConfig) -> float:
        """Load in load units (see module docstring)."""
        num_requests = max(self.inflight_requests, self.queue_depth + self.running)
        return num_requests + self.inflight_tokens / cfg.inflight_tokens_per_load_unit


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    matched_blocks: int = 0  # leading blocks of the request's chain this replica caches
    num_cached_blocks: int = 0  # blocks the index holds for this replica (cold tie-break)


@dataclass(frozen=True)
class RoutingDecision:
    ranked_replica_ids: list[str]  # every candidate, best first
    kind: DecisionKind
    matched_blocks: int = 0  # matched blocks of the first-ranked replica

    @property
    def replica_id(self) -> Optional[str]:
        return self.ranked_replica_ids[0] if self.ranked_replica_ids else None


def choose(request_block_hashes: Sequence[int], replicas: Sequence[ReplicaView],
           rng: random.Random, cfg: RouterPolicyConfig = RouterPolicyConfig()) -> RoutingDecision:
    """Rank ``replicas`` for a request whose chain is ``request_block_hashes``.

    ``matched_blocks`` in each view must already be computed for this chain
    (``PrefixIndex.match``); the hashes themselves are only used to tell a
    request that has none (no GenerateRequest) from one that has.
    """
    if not replicas:
        return RoutingDecision([], DecisionKind.NO_REPLICAS)
    loads = {r.replica_id: r.load.units(cfg) for r in replicas}
    min_load = min(loads.values())
    by_load = sorted(replicas, key=lambda r: (loads[r.replica_id], r.num_cached_blocks,
                                              -r.matched_blocks))
    if cfg.max_load_per_replica is not None and min_load >= cfg.max_load_per_replica:
        return _decision(by_load, DecisionKind.SATURATED)

    use_prefix = cfg.policy is RoutingPolicyKind.PREFIX_AFFINITY and len(request_block_hashes) > 0
    min_blocks = max(cfg.min_match_blocks, math.ceil(cfg.min_match_ratio * len(request_block_hashes)))
    owners = [r for r in replicas if r.matched_blocks >= min_blocks] if use_prefix else []
    if owners:
        def score(r: ReplicaView) -> float:
            return r.matched_blocks - cfg.load_weight * loads[r.replica_id]
        best = max(owners, key=lambda r: (score(r), -loads[r.replica_id], -r.num_cached_blocks))
        if loads[best.replica_id] - min_load > cfg.imbalance_threshold:
            return _decision(by_load, DecisionKind.LOAD_OVERRIDE)
        # Owners by score first, then the others by load, so Serve's fallback
        # (best rank full) still prefers cached prefixes.
        ranked_owners = sorted(owners, key=lambda r: (-score(r), loads[r.replica_id]))
        ranked_owners.remove(best)
        owner_ids = {r.replica_id for r in owners}
        rest = [r for r in by_load if r.replica_id not in owner_ids]
        return _decision([best] + ranked_owners + rest, DecisionKind.AFFINITY)

    # Cold prompt: power of two choices on load; cache size breaks ties.
    if len(replicas) <= 2:
        pair = list(replicas)
    else:
        pair = rng.sample(list(replicas), 2)
    pair.sort(key=lambda r: (loads[r.replica_id], r.num_cached_blocks, rng.random()))
    pair_ids = {r.replica_id for r in pair}
    return _decision(pair + [r for r in by_load if r.replica_id not in pair_ids],
                     DecisionKind.FALLBACK_P2C)


def _decision(ranked: list[ReplicaView], kind: DecisionKind) -> RoutingDecision:
    return RoutingDecision([r.replica_id for r in ranked], kind, ranked[0].matched_blocks)


# ---- the decode pool ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeReplicaView:
    replica_id: str
    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    num_free_blocks: Optional[int] = None  # estimated free KV blocks; None: no report yet


def num_blocks_needed(num_prompt_tokens: int, block_size: int) -> int:
    """KV blocks a decode replica reserves for a prompt and its first sampled token."""
    return -(-(num_prompt_tokens + 1) // block_size)


def choose_decode(num_blocks: int, replicas: Sequence[DecodeReplicaView], rng: random.Random,
                  cfg: RouterPolicyConfig = RouterPolicyConfig()) -> RoutingDecision:
    """Rank decode ``replicas`` for a prompt needing ``num_blocks`` KV blocks (module docstring).

    A replica whose ``num_free_blocks`` is None has not reported yet and counts
    as having room (a fresh replica has all its blocks free).
    """
    if not replicas:
        return RoutingDecision([], DecisionKind.NO_REPLICAS)
    loads = {r.replica_id: r.load.units(cfg) for r in replicas}
    tie_break = {r.replica_id: rng.random() for r in replicas}

    def rank(group: Sequence[DecodeReplicaView]) -> list[DecodeReplicaView]:
        free = {r.replica_id: math.inf if r.num_free_blocks is None else r.num_free_blocks for r in group}
        return sorted(group, key=lambda r: (loads[r.replica_id], -free[r.replica_id], tie_break[r.replica_id]))

    def decision(ranked: list[DecodeReplicaView], kind: DecisionKind) -> RoutingDecision:
        return RoutingDecision([r.replica_id for r in ranked], kind)

    if cfg.max_load_per_replica is not None and min(loads.values()) >= cfg.max_load_per_replica:
        return decision(rank(replicas), DecisionKind.SATURATED)
    with_room = [r for r in replicas if r.num_free_blocks is None or r.num_free_blocks >= num_blocks]
    if not with_room:
        return decision(rank(replicas), DecisionKind.KV_SHORT)
    room_ids = {r.replica_id for r in with_room}
    short = [r for r in replicas if r.replica_id not in room_ids]
    return decision(rank(with_room) + rank(short), DecisionKind.KV_ROOM)


class FreeBlockLedger:
    """Estimated free KV blocks per decode replica, between the replicas' reports.

    A replica reports its free blocks every few tenths of a second; requests
    routed to it meanwhile are not in the report yet, so the estimate is the
    last report minus the blocks of requests routed there since (still in
    flight). A report forgets the requests routed more than ``grace_s`` before
    it arrived: the replica reserved their blocks before taking it (a report
    reaches the router with some delay, so younger ones stay counted).
    """

    def __init__(self, grace_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self._clock = clock
        self._reported: dict[str, int] = {}
        # replica id -> [(request key, blocks, routed at)], requests not yet in a report
        self._unreported: dict[str, list[tuple[Hashable, int, float]]] = {}

    def report(self, replica_id: str, num_free_blocks: int) -> None:
        self._reported[replica_id] = num_free_blocks
        horizon = self._clock() - self.grace_s
        self._unreported[replica_id] = [e for e in self._unreported.get(replica_id, ()) if e[2] >= horizon]

    def on_dispatch(self, replica_id: str, request_key: Hashable, num_blocks: int) -> None:
        self._unreported.setdefault(replica_id, []).append((request_key, num_blocks, self._clock()))

    def on_complete(self, replica_id: str, request_key: Hashable) -> None:
        entries = self._unreported.get(replica_id, [])
        for i, entry in enumerate(entries):
            if entry[0] == request_key:
                del entries[i]
                return

    def num_free_blocks(self, replica_id: str) -> Optional[int]:
        """The estimate; None before the replica's first report."""
        reported = self._reported.get(replica_id)
        if reported is None:
            return None
        return max(0, reported - sum(e[1] for e in self._unreported.get(replica_id, ())))

    def remove(self, replica_id: str) -> None:
        self._reported.pop(replica_id, None)
        self._unreported.pop(replica_id, None)
