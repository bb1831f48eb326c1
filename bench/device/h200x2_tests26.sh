#!/bin/bash
# Third device call on nvidia-h200-x2 (#5, stop 26): the GPU tests of parallel replicas with
# stop 26's defaults (the GEMV tile sweep, and stop 25's LL no-wait, 1024 x 1 LL build and decode
# prefetch): every two-GPU case of test_parallel_gpu.py (TP=2, PP=2, EP=2, the 8B shape at TP=2;
# the 4-GPU cases skip), the LL all-reduce across both GPUs, the LL loopback tests (2 and 4 ranks
# on one GPU), and the kernel tests.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
gpu_tests parallel 330 tests/gpu/test_parallel_gpu.py
gpu_tests ll_allreduce 90 tests/gpu/test_ll_allreduce.py
CUDA_MODULE_LOADING=EAGER KVMESH_LOOPBACK_CHILD=1 gpu_tests ll_loopback 90 tests/gpu/test_ll_loopback.py
[ $SECONDS -lt 480 ] && gpu_tests kernels 100 tests/gpu/test_kernels.py
echo "done at ${SECONDS}s"
