#!/bin/bash
# One device call on nvidia-h200 (#5, stop 24): the LL no-wait and signal modes in the loopback
# harness on one GPU (tests/gpu/test_ll_loopback.py, run as its eager child directly, -v), and
# the GEMV and engine GPU tests the FLAG kernel's gemv.py changes touch (TP=1: no LL call, so
# the plain paths): test_kernels (GEMV, greedy) and test_engine_gpu.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
CUDA_MODULE_LOADING=EAGER KVMESH_LOOPBACK_CHILD=1 timeout 240 python3 -m pytest -v -p no:cacheprovider -x \
  tests/gpu/test_ll_loopback.py > $L/ll_loopback.txt 2>&1; echo "rc $?"
grep -E "PASSED|FAILED|ERROR|passed|failed" $L/ll_loopback.txt | tail -12
grep -E "^E " $L/ll_loopback.txt | head -10
gpu_tests kernels 200 tests/gpu/test_kernels.py
gpu_tests engine_gpu 200 tests/gpu/test_engine_gpu.py
