#!/bin/bash
# One device call on one H200 (#5, stop 25), while two GPUs are not lent:
#   1. correctness: the Triton attention tests and the decode PDL bit-identity test (the decode
#      kernel now reads the lengths and block table before it waits for the kernel before), the
#      loopback LL tests and the GEMV/linear kernel tests (the LL signal mode and its FLAG GEMV
#      are gone)
#   2. the 8B TP=1 batch-1 decode step with and without that prefetch (KVMESH_DECODE_PREFETCH=0),
#      interleaved twice
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -1
gpu_tests attention 150 tests/gpu/test_triton_attention.py
gpu_tests kernels 150 tests/gpu/test_kernels.py -k "decode or dependent or gemv or linear"
CUDA_MODULE_LOADING=EAGER KVMESH_LOOPBACK_CHILD=1 gpu_tests loopback 120 tests/gpu/test_ll_loopback.py
echo "tests done at ${SECONDS}s"
decode_step tp1 1 0
KVMESH_DECODE_PREFETCH=0 decode_step tp1_noprefetch 1 0
decode_step tp1_again 1 0
KVMESH_DECODE_PREFETCH=0 decode_step tp1_noprefetch_again 1 0
echo "done at ${SECONDS}s"
