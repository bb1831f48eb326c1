"""A replica's worker groups: topology (who is which rank), collectives, and group set-up.

    topology.py      ParallelRank, rank_layout, stage_layers, validate_parallel_sizes (plain Python)
    communicator.py  Communicator: all_reduce, all_gather, send, recv (the one interface)
    gloo.py          GlooCommunicator: torch.distributed gloo, CPU (CI)
    nccl.py          NcclCommunicator: CuPy NCCL on CUDA tensors, ids exchanged through Ray
    group.py         DistInit, rendezvous (worker 0), init_worker_groups (every worker)
"""

from engine.distributed.communicator import Communicator
from engine.distributed.topology import (SINGLE_RANK, ParallelRank, rank_layout, stage_layers,
                                         validate_parallel_sizes)

__all__ = ["Communicator", "ParallelRank", "SINGLE_RANK", "rank_layout", "stage_layers",
           "validate_parallel_sizes"]
