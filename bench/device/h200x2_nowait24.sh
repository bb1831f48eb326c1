#!/bin/bash
# One device call on nvidia-h200-x2 (#5, stop 24): the LL no-wait and signal modes across two GPUs.
#   1. correctness with both on (KVMESH_LL_NO_WAIT=1 KVMESH_LL_SIGNAL=1): test_ll_allreduce's
#      two ranks (NVLink; pushed calls single, back to back, in a replayed CUDA graph) and
#      test_parallel_gpu's llama-tp2 (bf16 tiny model at TP=2 vs one GPU)
#   2. the 8B-shape decode step at batch 1: TP=1 on GPU 0, then TP=2 on GPUs 0-1 with the LL
#      call waiting for the pushing GEMV (as before), no-wait, and no-wait + signal, in turn,
#      twice (stop 23: 3.932 / 2.462 ms, 0.626x). This stop's greedy-table change is in all.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
KVMESH_LL_NO_WAIT=1 KVMESH_LL_SIGNAL=1 gpu_tests ll_allreduce_signal 150 tests/gpu/test_ll_allreduce.py::test_two_ranks
KVMESH_LL_NO_WAIT=1 KVMESH_LL_SIGNAL=1 gpu_tests parallel_tp2_signal 200 tests/gpu/test_parallel_gpu.py -k "two_gpus and llama-tp2 and not pp2"
decode_step tp1 1 0
KVMESH_LL_NO_WAIT=0 decode_step tp2_wait 2 0,1
KVMESH_LL_NO_WAIT=1 decode_step tp2_nowait 2 0,1
KVMESH_LL_NO_WAIT=1 KVMESH_LL_SIGNAL=1 decode_step tp2_signal 2 0,1
echo "first round done at ${SECONDS}s"
[ $SECONDS -lt 380 ] && KVMESH_LL_NO_WAIT=0 decode_step tp2_wait_again 2 0,1
[ $SECONDS -lt 420 ] && KVMESH_LL_NO_WAIT=1 KVMESH_LL_SIGNAL=1 decode_step tp2_signal_again 2 0,1
[ $SECONDS -lt 460 ] && KVMESH_LL_NO_WAIT=1 decode_step tp2_nowait_again 2 0,1
echo "done at ${SECONDS}s"
