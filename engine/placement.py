"""What a multi-worker replica reserves from Ray: one bundle per worker, and the strategy.

Plain Python (no Ray, no torch): the router builds Serve's deployment options from it,
and ``RayExecutor`` schedules its workers by the same numbers, so the two cannot disagree.

    bundle index        in a Serve replica's group             standalone (the executor's own group)
    0                   the replica actor (scheduler)          worker rank 0
    1 + r  /  r         worker rank r                          worker rank r

    worker bundle:  {"GPU": 1, "CPU": 1} on GPUs    {"CPU": 0.2} on CPU (CI: a TP=2 x PP=2
                                                      replica fits on a 2-core box)
    strategy:       STRICT_PACK with one pipeline stage (a TP group shares a node's NVLink),
                    PACK with several (stages may land on other nodes when one is full)

Under Ray Serve the replica's group is made by Serve (``placement_group_bundles``) before
the replica starts, so a replica and all its workers are reserved at once, and Serve (or
the cluster autoscaler) sees the whole demand; the group goes away with the replica.
"""

from __future__ import annotations

from typing import Mapping, Optional

from engine.config import EngineConfig, ParallelConfig

CPU_WORKER_NUM_CPUS = 0.2  # fractional, so several workers fit on a small CI box
GPU_WORKER_NUM_CPUS = 1.0  # the worker's Python thread driving its GPU
REPLICA_BUNDLE_INDEX = 0  # in a Serve replica's group: the replica actor itself
FIRST_WORKER_BUNDLE_INDEX = 1  # in a Serve replica's group: worker rank r uses bundle 1 + r


def uses_gpus(config: EngineConfig, cluster_num_gpus: float) -> bool:
    """Whether the workers take one GPU each. ``device: auto`` means GPUs when the cluster has any."""
    device = config.device.device
    if device == "auto":
        return cluster_num_gpus >= 1
    return device.startswith("cuda")


def worker_bundle(is_gpu: bool) -> dict[str, float]:
    """One worker's resources: a GPU and a CPU, or a CPU slice."""
    return {"CPU": GPU_WORKER_NUM_CPUS, "GPU": 1.0} if is_gpu else {"CPU": CPU_WORKER_NUM_CPUS}


def placement_strategy(parallel: ParallelConfig) -> str:
    return "STRICT_PACK" if parallel.pipeline_parallel_size == 1 else "PACK"


def replica_bundles(config: EngineConfig, replica_bundle: Mapping[str, float], *,
                    is_gpu: bool) -> Optional[list[dict[str, float]]]:
    """Serve's ``placement_group_bundles`` for one replica: ``replica_bundle`` (the replica actor's
    own resources) then one bundle per worker; None where the replica runs its one worker
    in its own process (no group needed)."""
    if not config.parallel.uses_ray_workers:
        return None
    n = config.parallel.num_workers
    own = {name: float(amount) for name, amount in replica_bundle.items() if amount > 0}
    return [own] + [worker_bundle(is_gpu) for _ in range(n)]


def bundle_fits(demand: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    """Whether a worker asking ``demand`` can be scheduled into ``bundle``."""
    return all(bundle.get(name, 0.0) + 1e-9 >= amount for name, amount in demand.items() if amount > 0)


def worker_bundle_indices(group_bundles: list[Mapping[str, float]], num_worker_ranks: int,
                          demand: Mapping[str, float]) -> Optional[list[int]]:
    """Bundles of an existing group (a Serve replica's) for worker ranks 0..n-1: 1..n when the
    group has them and each fits ``demand``, else None (the executor then makes its own group)."""
    indices = list(range(FIRST_WORKER_BUNDLE_INDEX, FIRST_WORKER_BUNDLE_INDEX + num_worker_ranks))
    if len(group_bundles) < indices[-1] + 1:
        return None
    if not all(bundle_fits(demand, group_bundles[i]) for i in indices):
        return None
    return indices
