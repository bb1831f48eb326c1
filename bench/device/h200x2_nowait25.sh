#!/bin/bash
# One device call on nvidia-h200-x2 (#5, stop 25), after this stop's first (h200x2_merge25.sh):
#   1. correctness on GPU 0: the Triton attention tests and the decode PDL bit-identity test
#      (the decode kernel now reads the lengths and block table before it waits)
#   2. the 8B-shape batch-1 decode step: TP=1 with and without that prefetch
#      (KVMESH_DECODE_PREFETCH=0), and TP=2 with the LL call waiting for the pushing GEMV (the
#      default) and with KVMESH_LL_NO_WAIT=1, interleaved twice; each TP=2 run also replays its
#      batch-1 graph on both ranks at once (device only: TP=2's host gap). The first call had
#      no-wait only with the last-program merge (since reverted): 2.475 against 2.571 ms.
#   3. time allowing: the loopback LL tests (the signal mode is gone), then TP=2 engine
#      equality with no-wait on
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
CUDA_VISIBLE_DEVICES=0 gpu_tests attention 150 tests/gpu/test_triton_attention.py
CUDA_VISIBLE_DEVICES=0 gpu_tests kernels_decode 90 tests/gpu/test_kernels.py -k "decode or dependent"
echo "tests done at ${SECONDS}s"
decode_step tp1 1 0
KVMESH_DECODE_PREFETCH=0 decode_step tp1_noprefetch 1 0
KVMESH_LL_NO_WAIT=0 decode_step tp2_wait 2 0,1
KVMESH_LL_NO_WAIT=1 decode_step tp2_nowait 2 0,1
KVMESH_LL_NO_WAIT=0 decode_step tp2_wait_again 2 0,1
KVMESH_LL_NO_WAIT=1 decode_step tp2_nowait_again 2 0,1
decode_step tp1_again 1 0
echo "steps done at ${SECONDS}s"
[ $SECONDS -lt 470 ] && CUDA_VISIBLE_DEVICES=0 CUDA_MODULE_LOADING=EAGER KVMESH_LOOPBACK_CHILD=1 gpu_tests loopback 90 tests/gpu/test_ll_loopback.py
[ $SECONDS -lt 430 ] && KVMESH_LL_NO_WAIT=1 gpu_tests parallel_tp2_nowait 150 tests/gpu/test_parallel_gpu.py -k "two_gpus and llama-tp2 and not pp2"
echo "done at ${SECONDS}s"
