#!/bin/bash
# One device call on nvidia-h200 (#5, stop 24, last): the final commit's GPU checks on one H200:
# the LL loopback (every mode), the engine GPU tests (Triton backend, CUDA graphs, async
# scheduling; the detokenizer's DecodeStream runs in them too), the greedy and GEMV kernels.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
CUDA_MODULE_LOADING=EAGER KVMESH_LOOPBACK_CHILD=1 timeout 200 python3 -m pytest -q -p no:cacheprovider -x \
  tests/gpu/test_ll_loopback.py > $L/ll_loopback.txt 2>&1; echo "ll_loopback: $(tail -1 $L/ll_loopback.txt)"
gpu_tests engine_gpu 200 tests/gpu/test_engine_gpu.py
gpu_tests kernels_gemv_greedy 200 tests/gpu/test_kernels.py -k "greedy or gemv or linear"
