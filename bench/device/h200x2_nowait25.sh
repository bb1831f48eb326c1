#!/bin/bash
# One device call on nvidia-h200-x2 (#5, stop 25): the LL no-wait mode alone against the default
# (the LL call waits for the pushing GEMV to end), interleaved twice, with TP=1 before and after;
# each TP=2 run also replays its batch-1 graph on both ranks at once (device only: the host gap).
# The first call of this stop (h200x2_merge25.sh) had no-wait only with the last-program merge,
# since reverted: TP=2 2.475 ms against 2.571 without no-wait.
#   then, time allowing: TP=2 engine equality (llama-tp2 tiny, bf16) with no-wait on
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
decode_step tp1 1 0
KVMESH_LL_NO_WAIT=0 decode_step tp2_wait 2 0,1
KVMESH_LL_NO_WAIT=1 decode_step tp2_nowait 2 0,1
KVMESH_LL_NO_WAIT=0 decode_step tp2_wait_again 2 0,1
KVMESH_LL_NO_WAIT=1 decode_step tp2_nowait_again 2 0,1
decode_step tp1_again 1 0
echo "steps done at ${SECONDS}s"
[ $SECONDS -lt 420 ] && KVMESH_LL_NO_WAIT=1 gpu_tests parallel_tp2_nowait 160 tests/gpu/test_parallel_gpu.py -k "two_gpus and llama-tp2 and not pp2"
echo "done at ${SECONDS}s"
