#!/bin/bash
# One device call on nvidia-h200-x2 (#5, stop 24): the LL no-wait mode across two GPUs.
#   1. tests/gpu/test_ll_allreduce.py::test_two_ranks with KVMESH_LL_NO_WAIT=1 (NVLink; its
#      pushed checks: single calls, 300 back-to-back calls, a replayed CUDA graph)
#   2. the 8B-shape decode step at batch 1: TP=1 on GPU 0, TP=2 on GPUs 0-1 with
#      KVMESH_LL_NO_WAIT=1 and =0 in turn, twice (stop 23: 3.932 / 2.462 ms, 0.626x)
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
KVMESH_LL_NO_WAIT=1 gpu_tests ll_allreduce_nowait 150 tests/gpu/test_ll_allreduce.py::test_two_ranks
decode_step tp1 1 0
KVMESH_LL_NO_WAIT=1 decode_step tp2_nowait 2 0,1
KVMESH_LL_NO_WAIT=0 decode_step tp2_wait 2 0,1
KVMESH_LL_NO_WAIT=1 decode_step tp2_nowait_again 2 0,1
KVMESH_LL_NO_WAIT=0 decode_step tp2_wait_again 2 0,1
echo "done at ${SECONDS}s"
[ $SECONDS -lt 420 ] && decode_step tp1_again 1 0
tail -3 $L/tp2_nowait.err
