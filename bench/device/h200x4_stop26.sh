#!/bin/bash
# A device call on nvidia-h200-x4 (#5, stop 26), if one is lent: the first 4-GPU run since stop 17,
# with stops 18-26's defaults (pushing GEMV's early reads, LL no-wait and its 1024 x 1 build,
# decode prefetch, the GEMV tile sweep):
#   1. the 4-GPU cases of test_parallel_gpu.py (TP=4, TP=2 x PP=2, Qwen2-MoE TP=2 x EP=2 x PP=2,
#      EP=4, the 8B shape at TP=4) and the LL all-reduce across 4 GPUs
#   2. the 8B batch-1 decode step at TP=1 (GPU 0) and TP=4 (GPUs 0-3)
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -4
decode_step tp1 1 0
decode_step tp4 4 0,1,2,3
gpu_tests parallel4 300 tests/gpu/test_parallel_gpu.py -k "four_gpus or test_8b_shape_serves_at_tp[4]"
gpu_tests ll_allreduce4 60 tests/gpu/test_ll_allreduce.py
echo "done at ${SECONDS}s"
