#!/bin/bash
# One device call on nvidia-h200-x2 (#5, stop 25), after this stop's first two-GPU call
# (h200x2_merge25.sh) and its one-H200 call (h200_prefetch25.sh: the decode prefetch, on here):
#   the 8B-shape batch-1 decode step, TP=1 on GPU 0, and TP=2 on GPUs 0-1 with the LL call
#   waiting for the pushing GEMV (the default) and with KVMESH_LL_NO_WAIT=1, interleaved twice,
#   then TP=1 again; each TP=2 run also replays its batch-1 graph on both ranks at once (device
#   only: TP=2's host gap). The first call had no-wait only with the last-program merge (since
#   reverted): 2.475 against 2.571 ms.
#   then, time allowing: no-wait with the LL kernel built as 1024 threads x 1 line, and TP=2
#   engine equality (llama-tp2 tiny, bf16) with no-wait on
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
# the LL kernel as 1024 threads of one line each (the default build: 512 x 2), with no-wait
[ $SECONDS -lt 400 ] && KVMESH_LL_BUILDS=1024x1 KVMESH_LL_NO_WAIT=1 decode_step tp2_nowait_1024 2 0,1
[ $SECONDS -lt 410 ] && KVMESH_LL_NO_WAIT=1 gpu_tests parallel_tp2_nowait 150 tests/gpu/test_parallel_gpu.py -k "two_gpus and llama-tp2 and not pp2"
echo "done at ${SECONDS}s"
