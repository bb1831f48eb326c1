"""RayExecutor: a replica's workers as Ray actors in one placement group.

    LLMEngine (scheduler, once per replica)
        │ execute_model(SchedulerOutput)        one ray.put, the same ref to every worker
        ▼
    RayExecutor ──▶ Worker rank 0 ─┐  stage 0 (TP/EP group: all_reduce / all_gather)
                ──▶ Worker rank 1 ─┘       │ send hidden states (pipeline)
                ──▶ Worker rank 2 ─┐  stage 1
                ──▶ Worker rank 3 ─┘──▶ ModelOutput (last stage, stage rank 0) ──▶ scheduler

Placement (``engine/placement.py``): one bundle per worker ({"GPU": 1, "CPU": 1} on GPUs,
a CPU slice in CI); STRICT_PACK when there is one stage (a TP group must share a node's
NVLink), PACK with pipeline stages (stages may land on other nodes when one is full).
Inside a Ray Serve replica, Serve has already reserved the group (the deployment's
``placement_group_bundles``: bundle 0 is the replica actor, bundles 1..N its workers),
so the workers go into that group's bundles 1..N and the group stays Serve's. Standalone
(``LLM``, benchmarks) the executor creates its own group and removes it at shutdown.

Faults: any worker error or death during a step leaves the groups out of step
(peers may wait in a collective forever), so the executor marks itself dead,
kills all its workers and frees its own placement group (a Serve replica's group is
freed by Serve when it replaces the replica). The failing step raises
``WorkerDiedError``; the engine ends that step's requests with an error;
``check_health`` raises from then on, so Ray Serve replaces the replica. A
worker that dies between steps is noticed by ``check_health`` too: each worker
holds one call open in a separate concurrency group, which fails when it dies.

This is the one engine module that imports Ray.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import ray
import torch
from ray.util.placement_group import (PlacementGroup, get_current_placement_group, placement_group,
                                      remove_placement_group)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.config import EngineConfig
from engine.distributed.group import resolve_backend
from engine.distributed.topology import rank_layout, validate_parallel_sizes
from engine.executor import Executor, resolve_max_model_len
from engine.models.spec import ModelSpec
from engine.placement import (placement_strategy, uses_gpus, worker_bundle,
                              worker_bundle_indices)
from engine.scheduler_output import ModelOutput, SchedulerOutput
from engine.worker import Worker

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120.0  # reserving the group's resources; then fail with the bundle list
INIT_TIMEOUT_S = 900.0  # group set-up + loading a shard of a large checkpoint
STEP_TIMEOUT_S = 300.0  # one step; longer means a peer hangs -> the replica is dead
WATCH_GROUP = "watch"  # concurrency group of the liveness call, apart from the step calls


class WorkerDiedError(RuntimeError):
    """A worker of this replica failed or died; the replica must be replaced."""


class _WatchedWorker(Worker):
    """Worker plus a call that blocks until shutdown: its failure means the actor died."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import threading
        self._exit = threading.Event()

    def wait_until_exit(self) -> None:
        self._exit.wait()

    def shutdown(self) -> None:
        super().shutdown()
        self._exit.set()


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, spec: ModelSpec, model_path: str) -> None:
        validate_parallel_sizes(config.parallel, spec)
        if not ray.is_initialized():
            ray.init()  # a local cluster; inside Ray Serve we are already connected
        self.config = config
        self.ranks = rank_layout(config.parallel)
        self.output_index = next(r.rank for r in self.ranks if r.is_output_rank)
        self._dead: Optional[str] = None
        self._last_future: Optional[_RayStepFuture] = None  # the newest step launched asynchronously
        self.is_gpu = uses_gpus(config, ray.cluster_resources().get("GPU", 0))
        backend = resolve_backend(config.parallel.distributed_backend,
                                  torch.device("cuda" if self.is_gpu else "cpu"))
        bundle = worker_bundle(self.is_gpu)
        strategy = placement_strategy(config.parallel)
        # The group the workers go into, and whether this executor made it (then it removes it).
        self.placement_group, self.bundle_indices = self._replica_group(bundle)
        self.owns_placement_group = self.placement_group is None
        if self.placement_group is None:
            self.placement_group = self._own_group(bundle, strategy)
            self.bundle_indices = [rank.rank for rank in self.ranks]
        actor_cls = ray.remote(concurrency_groups={WATCH_GROUP: 1})(_WatchedWorker)
        max_model_len = resolve_max_model_len(config, spec)
        self.workers = [
            actor_cls.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=index),
            ).remote(config, spec, model_path, rank, max_model_len)
            for rank, index in zip(self.ranks, self.bundle_indices)]
        self._watch_refs = [w.wait_until_exit.options(concurrency_group=WATCH_GROUP).remote()
                            for w in self.workers]
        start = time.monotonic()
        dist_init = self._call_all([self.workers[0].rendezvous.remote(backend)], INIT_TIMEOUT_S)[0]
        self._call_all([w.init.remote(dist_init) for w in self.workers], INIT_TIMEOUT_S)
        logger.info("%d workers (%s) ready in %.1fs in %s placement group, bundles %s",
                    len(self.workers), backend.value, time.monotonic() - start,
                    f"its own {strategy}" if self.owns_placement_group else "the replica's",
                    self.bundle_indices)

    def _replica_group(self, bundle: dict[str, float]) -> tuple[Optional[PlacementGroup], list[int]]:
        """The placement group this process runs in (a Serve replica's, from the deployment's
        ``placement_group_bundles``) and its bundles 1..N for the workers; (None, []) when this
        process is in no group, or in one without a fitting bundle per worker."""
        group = get_current_placement_group()
        if group is None:
            return None, []
        indices = worker_bundle_indices(group.bundle_specs, len(self.ranks), bundle)
        if indices is None:
            logger.warning("this process runs in placement group %s with bundles %s, which has no "
                           "bundle %s for each of %d workers at indices 1..%d; the workers get a "
                           "placement group of their own", group.id.hex(), group.bundle_specs,
                           bundle, len(self.ranks), len(self.ranks))
            return None, []
        return group, indices

    def _own_group(self, bundle: dict[str, float], strategy: str) -> PlacementGroup:
        """A new group of one bundle per worker (standalone use); raises if it cannot be reserved."""
        group = placement_group([dict(bundle) for _ in self.ranks], strategy=strategy)
        ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(group)
            parallel = self.config.parallel
            raise RuntimeError(f"could not reserve {len(self.ranks)} x {bundle} ({strategy}) for "
                               f"tp={parallel.tensor_parallel_size} "
                               f"pp={parallel.pipeline_parallel_size} "
                               f"ep={parallel.expert_parallel_size} within {PLACEMENT_TIMEOUT_S:.0f}s; "
                               f"cluster has {ray.available_resources()}")
        return group

    # ---- the executor interface ---------------------------------------------------------------
    def determine_num_blocks(self) -> int:
        """The minimum over workers: every worker holds the same block ids for its layers."""
        return min(self._call_all([w.determine_num_blocks.remote() for w in self.workers], INIT_TIMEOUT_S))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call_all([w.initialize_kv_cache.remote(num_blocks) for w in self.workers], INIT_TIMEOUT_S)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        self.check_health()
        so_ref = ray.put(scheduler_output)  # serialised once, fetched by every worker
        results = self._call_all([w.execute_model.remote(so_ref) for w in self.workers], STEP_TIMEOUT_S)
        return results[self.output_index]

    # ---- async scheduling (one stage): each call launches a step and returns the one before ---
    @property
    def supports_async(self) -> bool:
        return self.config.parallel.pipeline_parallel_size == 1  # the ids stay on the last stage

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> "_RayStepFuture":
        self.check_health()
        so_ref = ray.put(scheduler_output)
        refs = [w.execute_model_pipelined.remote(so_ref) for w in self.workers]
        if self._last_future is not None:
            self._last_future.refs = refs  # these calls return the previous step's output
        future = self._last_future = _RayStepFuture(self)
        return future

    def _flush(self, future: "_RayStepFuture") -> None:
        if future.refs is None:  # no later step was launched: ask for it
            future.refs = [w.flush.remote() for w in self.workers]
            if self._last_future is future:
                self._last_future = None

    def check_health(self) -> None:
        if self._dead is None:
            died, _ = ray.wait(self._watch_refs, num_returns=1, timeout=0)
            if died:
                self._mark_dead(f"worker {self._watch_refs.index(died[0])} exited: {_error_of(died[0])}")
        if self._dead is not None:
            raise WorkerDiedError(self._dead)

    def shutdown(self) -> None:
        workers, self.workers = getattr(self, "workers", []), []
        if workers and self._dead is None:
            try:
                ray.wait([w.shutdown.remote() for w in workers], num_returns=len(workers), timeout=10)
            except Exception:  # best effort: the actors are killed below anyway
                pass
        for w in workers:
            ray.kill(w)
        pg = getattr(self, "placement_group", None)
        if pg is not None and getattr(self, "owns_placement_group", False):
            self.placement_group = None
            remove_placement_group(pg)  # a Serve replica's group is Serve's to remove

    # ---- helpers ------------------------------------------------------------------------------
    def _call_all(self, refs: list, timeout_s: float) -> list:
        """Results of calls on several workers, in order. The first failure (or a timeout) marks
        the executor dead and raises at once, without waiting for peers stuck in collectives."""
        pending, deadline = list(refs), time.monotonic() + timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
            if not ready:
                self._mark_dead(f"{len(pending)} of {len(refs)} worker calls did not finish in {timeout_s:.0f}s")
                raise WorkerDiedError(self._dead)
            try:
                ray.get(ready[0])
            except Exception as exc:
                self._mark_dead(f"worker {refs.index(ready[0])} failed: {type(exc).__name__}: {exc}")
                raise WorkerDiedError(self._dead) from exc
        return ray.get(refs)

    def _mark_dead(self, reason: str) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        logger.error("replica's worker group is dead (%s); killing its workers", reason)
        self.shutdown()


class _RayStepFuture:
    """A step launched on the workers; its output arrives with the next step's calls (or a flush)."""

    def __init__(self, executor: RayExecutor) -> None:
        self.executor = executor
        self.refs: Optional[list] = None
        self._output: Optional[ModelOutput] = None

    def result(self) -> ModelOutput:
        if self._output is None:
            self.executor._flush(self)
            results = self.executor._call_all(self.refs, STEP_TIMEOUT_S)
            self._output = results[self.executor.output_index] or ModelOutput()
        return self._output


def _error_of(ref) -> str:
    try:
        ray.get(ref, timeout=0)
        return "it returned"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
