#!/bin/bash
# One device call on nvidia-h200-x2 (#5, stop 25): the decode attention's last-program merge
# (one launch a layer instead of decode + merge kernel) and the LL no-wait mode alone.
#   1. correctness on GPU 0: the Triton attention tests (the merge under contention, forced
#      splits, graph replay), the decode PDL test, the engine's GPU tests
#   2. the 8B-shape decode step at batch 1: TP=1 on GPU 0 and TP=2 on GPUs 0-1, each with the
#      merge (the new default) and with the merge kernel (KVMESH_DECODE_MERGE_KERNEL=1), and
#      TP=2 with KVMESH_LL_NO_WAIT=1 (stop 24: TP=1 3.988, TP=2 2.498 ms, 0.626x)
#   3. time allowing: the LL all-reduce's two ranks with no-wait on (NVLink)
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
CUDA_VISIBLE_DEVICES=0 gpu_tests attention 150 tests/gpu/test_triton_attention.py
CUDA_VISIBLE_DEVICES=0 gpu_tests kernels_decode 90 tests/gpu/test_kernels.py -k "decode or dependent"
echo "tests done at ${SECONDS}s"
decode_step tp1 1 0
KVMESH_DECODE_MERGE_KERNEL=1 decode_step tp1_merge_kernel 1 0
decode_step tp2 2 0,1
KVMESH_DECODE_MERGE_KERNEL=1 decode_step tp2_merge_kernel 2 0,1
KVMESH_LL_NO_WAIT=1 decode_step tp2_nowait 2 0,1
echo "steps done at ${SECONDS}s"
[ $SECONDS -lt 430 ] && CUDA_VISIBLE_DEVICES=0 gpu_tests engine 100 tests/gpu/test_engine_gpu.py
[ $SECONDS -lt 480 ] && KVMESH_LL_NO_WAIT=1 gpu_tests ll_nowait 80 tests/gpu/test_ll_allreduce.py::test_two_ranks
[ $SECONDS -lt 520 ] && decode_step tp1_again 1 0
echo "done at ${SECONDS}s"
