#!/bin/bash
# One device call on nvidia-h200 (#5, stop 21): the pushing GEMV reading the LL round word as soon
# as the kernel before has ended (EARLY_ROUND) vs after its sum (before): the loopback LL tests
# (the pushing GEMV against the plain GEMV then the call), the GEMV kernel tests, and
# bench/push_gemv.py's layer chain (plain / late / early, twice each).
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests ll_loopback 300 tests/gpu/test_ll_loopback.py
gpu_tests gemv_kernels 200 tests/gpu/test_kernels.py -k "gemv"
timeout 200 python3 bench/push_gemv.py --out $OUT/push_gemv_h200.json 2>&1 | tail -8
