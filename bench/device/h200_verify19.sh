#!/bin/bash
# One device call on nvidia-h200 (stop 19, last): main after moving the GEMV tuner to
# engine/kernels/gemv_tune.py: the single-GPU kernel and engine tests, and the TP=1 8B decode step.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests single_gpu 300 -m "gpu and not multigpu and not multigpu4" tests/gpu/test_kernels.py \
    tests/gpu/test_engine_gpu.py tests/gpu/test_no_recompile.py
decode_step tp1 1 0
