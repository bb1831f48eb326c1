#!/bin/bash
# One device call on nvidia-h200 (#5, stop 21): main after the vocab-parallel changes (partial
# embedding lookup left to the first norm; greedy ids without gathering logits): the single-GPU
# kernel, engine and LL loopback tests, and the TP=1 8B decode step.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests single_gpu 330 -m "gpu and not multigpu and not multigpu4" tests/gpu/test_kernels.py \
    tests/gpu/test_engine_gpu.py tests/gpu/test_no_recompile.py tests/gpu/test_ll_loopback.py
decode_step tp1 1 0
cp $L/*.txt $OUT/ 2>/dev/null
