"""RayExecutor: a replica's workers as Ray actors in one placement group.

    LLMEngine (scheduler, once per replica)
        │ execute_model(SchedulerOutput)
        ▼
    RayExecutor ──▶ Worker rank 0 ─┐  stage 0 (TP/EP group: all_reduce / all_gather)
                ──▶ Worker rank 1 ─┘       │ send hidden states (pipeline)
                ──▶ Worker rank 2 ─┐  stage 1
                ──▶ Worker rank 3 ─┘──▶ ModelOutput (last stage, stage rank 0) ──▶ scheduler

How a step reaches the workers (``_launch`` / ``_collect``):

    all workers on the driver's node (the usual case)      otherwise, or KVMESH_SHM_CHANNEL=0
    ┌────────────┐ StepCall  ┌──────────────────┐          ┌────────────┐ ray.put(args) once
    │ RayExecutor│──────────▶│ broadcast ring   │──▶ each  │ RayExecutor│ w.<method>.remote(ref)
    │ (_Step-    │  (shm)    │ 4 slots x 4 MiB  │  worker's│            │ per worker, then
    │  Channel)  │◀──────────│ reply ring/worker│◀── step  │            │ ray.wait / ray.get
    └────────────┘ StepReply └──────────────────┘   loop   └────────────┘ (_call_all)
                                                   thread

The shared-memory channel (``engine/step_channel.py`` over ``engine/distributed/shm_channel.py``) takes the Ray call round trip
(the driver's put, calls and waits, each worker's call handling) out of every step: after
``initialize_kv_cache`` each worker starts one step-loop thread (``Worker.start_step_loop``)
that runs every runner-touching call from the ring in order, so the runner is only ever
touched by that thread; the executor then sends every such call (execute_model,
execute_model_pipelined, flush, export_kv, import_kv, shutdown) through the ring. While it
waits for replies it polls the workers' liveness calls (``ray.wait(timeout=0)``) every
``LIVENESS_POLL_S``, so a worker killed mid-step is noticed within that, not at the timeout.
The executor creates (and at shutdown unlinks) every segment; workers only attach.

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
import os
import time
from typing import Any, Callable, Optional

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
from engine.step_channel import StepChannel, StepMethod, WorkerCallFailed
from engine.worker import Worker

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120.0  # reserving the group's resources; then fail with the bundle list
INIT_TIMEOUT_S = 900.0  # group set-up + loading a shard of a large checkpoint
STEP_TIMEOUT_S = 300.0  # one step; longer means a peer hangs -> the replica is dead
WATCH_GROUP = "watch"  # concurrency group of the liveness call, apart from the step calls
SHM_CHANNEL_ENV = "KVMESH_SHM_CHANNEL"  # "0": Ray calls for every step even on one node
SHM_SPIN_ENV = "KVMESH_SHM_SPIN_US"  # how long a ring wait spins before it sleeps
SHM_SPIN_S = {True: 0.02, False: 0.0005}  # is_gpu -> spin: a GPU step's length; little on CPU
LIVENESS_POLL_S = 0.2  # while waiting on the rings: how often the workers' liveness is checked


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
        self._next_step_check = 0.0  # time.monotonic() after which a step checks the workers again
        self._last_future: Optional[_RayStepFuture] = None  # the newest step launched asynchronously
        self._channel: Optional[StepChannel] = None  # set once the workers run their step loops
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
        self._channel = self._start_step_channel()  # from here on, steps go through it if it exists

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        self._check_step_health()
        results = self._collect(self._launch(StepMethod.EXECUTE_MODEL, scheduler_output), STEP_TIMEOUT_S)
        return results[self.output_index]

    def export_kv(self, block_ids: list[int]) -> list[torch.Tensor]:
        """One CPU staging tensor per rank (each rank's layers and heads), in rank order."""
        self.check_health()
        return self._collect(self._launch(StepMethod.EXPORT_KV, block_ids), STEP_TIMEOUT_S)

    def import_kv(self, block_ids: list[int], kv: list[torch.Tensor]) -> None:
        """``kv`` as ``export_kv`` gives it (one tensor per rank); each rank takes its own."""
        self.check_health()
        self._collect(self._launch(StepMethod.IMPORT_KV, block_ids, list(kv)), STEP_TIMEOUT_S)

    def profile(self, action: str, num_steps: int = 1) -> list[Optional[dict]]:
        """Starts (``"start"``) or stops (``"stop"``) a kernel profile in every worker; on stop,
        each rank's kernels per step (``Worker.profile``), in rank order."""
        return self._call_all([w.profile.remote(action, num_steps) for w in self.workers], INIT_TIMEOUT_S)

    def replay_decode_graph(self, replays: int, rounds: int) -> list[Optional[dict]]:
        """Every worker replays its batch-1 decode graph at once (``Worker.replay_decode_graph``;
        benchmarks, between requests), in rank order."""
        return self._call_all([w.replay_decode_graph.remote(replays, rounds) for w in self.workers],
                              INIT_TIMEOUT_S)

    def step_stamps(self, last: int) -> list[list[tuple[int, float, float, float, float]]]:
        """Each worker's last ``last`` step-loop calls (``Worker.step_stamps``), in rank order;
        empty lists where steps go as Ray calls (no step loop)."""
        return self._call_all([w.step_stamps.remote(last) for w in self.workers], INIT_TIMEOUT_S)

    # ---- async scheduling (one stage): each call launches a step and returns the one before ---
    @property
    def supports_async(self) -> bool:
        return self.config.parallel.pipeline_parallel_size == 1  # the ids stay on the last stage

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> "_RayStepFuture":
        self._check_step_health()
        token = self._launch(StepMethod.EXECUTE_MODEL_PIPELINED, scheduler_output)
        if self._last_future is not None:
            self._last_future.token = token  # these calls return the previous step's output
        future = self._last_future = _RayStepFuture(self)
        return future

    def _flush(self, future: "_RayStepFuture") -> None:
        if future.token is None:  # no later step was launched: ask for it
            future.token = self._launch(StepMethod.FLUSH)
            if self._last_future is future:
                self._last_future = None

    def check_health(self) -> None:
        """Raises ``WorkerDiedError`` if a worker has exited (one ``ray.wait`` on their watch calls)."""
        if self._dead is None:
            self._next_step_check = time.monotonic() + LIVENESS_POLL_S
            died, _ = ray.wait(self._watch_refs, num_returns=1, timeout=0)
            if died:
                self._mark_dead(f"worker {self._watch_refs.index(died[0])} exited: {_error_of(died[0])}")
        if self._dead is not None:
            raise WorkerDiedError(self._dead)

    def _check_step_health(self) -> None:
        """``check_health`` before a step, at most once every LIVENESS_POLL_S: its ``ray.wait``
        costs the driver 0.1-0.2 ms, every step at that. A worker that died in between is still
        found within LIVENESS_POLL_S, by the poll while the step's replies are awaited."""
        if self._dead is not None or time.monotonic() >= self._next_step_check:
            self.check_health()

    def shutdown(self) -> None:
        workers, self.workers = getattr(self, "workers", []), []
        channel, self._channel = getattr(self, "_channel", None), None
        if workers and self._dead is None:
            try:
                if channel is not None:  # the step loops run the shutdown, then end
                    channel.gather(channel.send(StepMethod.SHUTDOWN), timeout_s=10, poll=lambda: None)
                else:
                    ray.wait([w.shutdown.remote() for w in workers], num_returns=len(workers), timeout=10)
            except Exception:  # best effort: the actors are killed below anyway
                pass
        for w in workers:
            ray.kill(w)
        if channel is not None:
            channel.close()  # unlinks every segment: none outlives the executor
        pg = getattr(self, "placement_group", None)
        if pg is not None and getattr(self, "owns_placement_group", False):
            self.placement_group = None
            remove_placement_group(pg)  # a Serve replica's group is Serve's to remove

    # ---- how calls reach the workers: the shared-memory channel, or Ray calls -----------------
    def _start_step_channel(self) -> Optional["StepChannel"]:
        """Starts the workers' step loops on a new channel; None (Ray calls) when it can't be used."""
        if os.environ.get(SHM_CHANNEL_ENV, "1") == "0":
            logger.info("%s=0: steps go to the workers as Ray calls", SHM_CHANNEL_ENV)
            return None
        here = ray.get_runtime_context().get_node_id()
        nodes = self._call_all([w.__ray_call__.remote(_node_id) for w in self.workers], INIT_TIMEOUT_S)
        if any(node != here for node in nodes):
            logger.info("workers on other nodes (%s; driver on %s): steps go as Ray calls", nodes, here)
            return None
        spin_s = (float(os.environ[SHM_SPIN_ENV]) / 1e6 if os.environ.get(SHM_SPIN_ENV)
                  else SHM_SPIN_S[self.is_gpu])
        try:
            channel = StepChannel(len(self.workers), spin_s, poll=self._poll_liveness,
                                  write_timeout_s=STEP_TIMEOUT_S, poll_interval_s=LIVENESS_POLL_S)
        except OSError as exc:  # e.g. no /dev/shm room: the Ray path still works
            logger.warning("no shared-memory step channel (%s): steps go as Ray calls", exc)
            return None
        try:
            self._call_all([w.start_step_loop.remote(channel.handles(i))
                            for i, w in enumerate(self.workers)], INIT_TIMEOUT_S)
        except BaseException:
            channel.close()
            raise
        return channel

    def _launch(self, method: StepMethod, *args: Any) -> Any:
        """Sends one call to every worker; the token for ``_collect`` (a seq, or Ray refs)."""
        if self._channel is not None:
            return self._on_channel(lambda channel: channel.send(method, *args))
        arg_refs = [ray.put(arg) for arg in args]  # serialised once, fetched by every worker
        return [_RAY_METHODS[method](w).remote(*arg_refs) for w in self.workers]

    def _collect(self, token: Any, timeout_s: float) -> list:
        """Every worker's result of the launched call, in rank order; failures as ``_call_all``."""
        if isinstance(token, int):
            replies = self._on_channel(lambda channel: channel.gather(token, timeout_s))
            return [reply.value for reply in replies]
        return self._call_all(token, timeout_s)

    def _on_channel(self, use: Callable[["StepChannel"], Any]) -> Any:
        """Runs ``use`` on the channel, turning a worker's error or a timeout into a dead replica."""
        if self._channel is None:
            raise WorkerDiedError(self._dead or "the executor is shut down")
        try:
            return use(self._channel)
        except WorkerCallFailed as exc:
            self._mark_dead(f"worker {exc.worker_index} failed: {exc.reply.error}")
            raise WorkerDiedError(self._dead) from exc
        except TimeoutError as exc:
            self._mark_dead(f"worker calls did not finish: {exc}")
            raise WorkerDiedError(self._dead) from exc

    def _poll_liveness(self) -> None:
        """Raises ``WorkerDiedError`` (the executor marked dead) if a worker has exited."""
        self.check_health()

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
        self.token: Any = None  # _launch's token of the call that returns this step's output
        self._output: Optional[ModelOutput] = None

    def result(self) -> ModelOutput:
        if self._output is None:
            self.executor._flush(self)
            results = self.executor._collect(self.token, STEP_TIMEOUT_S)
            self._output = results[self.executor.output_index] or ModelOutput()
        return self._output


def _error_of(ref) -> str:
    try:
        ray.get(ref, timeout=0)
        return "it returned"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _node_id(_worker: Worker) -> str:
    """Runs in a worker actor (``__ray_call__``): the Ray node it lives on."""
    return ray.get_runtime_context().get_node_id()


_RAY_METHODS: dict[StepMethod, Callable[[Any], Any]] = {  # the Ray path's actor method per call
    StepMethod.EXECUTE_MODEL: lambda w: w.execute_model,
    StepMethod.EXECUTE_MODEL_PIPELINED: lambda w: w.execute_model_pipelined,
    StepMethod.FLUSH: lambda w: w.flush,
    StepMethod.EXPORT_KV: lambda w: w.export_kv,
    StepMethod.IMPORT_KV: lambda w: w.import_kv,
    StepMethod.SHUTDOWN: lambda w: w.shutdown,
}
