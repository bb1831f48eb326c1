#!/bin/bash
# Second device call on nvidia-h200-x2 (#5, stop 26), after h200x2_sweep26.sh (TP=2 with the
# in-graph GEMV tile sweep: 2.367 / 2.362 ms against TP=1's 3.958 / 3.955 ms):
#   1. TP=2 against one GPU with the sweep on: the tiny Llama in bf16 and the 8B shape
#   2. bench/parallel.py: all-reduce bandwidth at 2 ranks against raw NCCL, the 8B decode step
#      at TP=1 and TP=2 (another pair for the 0.6x target), and max load, 128 requests
#      128 -> 128: two TP=1 engines at once (64 each) against one TP=2 engine
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
gpu_tests parallel_tp2 240 tests/gpu/test_parallel_gpu.py -k "(two_gpus and llama-tp2 and not pp2) or test_8b_shape_serves_at_tp[2]"
echo "tests done at ${SECONDS}s"
timeout 340 python3 bench/parallel.py all --parts allreduce2,tp1,tp2 --budget-s 330 \
    --num-requests 128 --out "$OUT/parallel.json" > $L/parallel.log 2>&1
python3 bench/device/parallel_summary.py "$OUT/parallel.json" --ranks 2 --rows 6
rm -rf "$OUT"/parallel*.logs
echo "done at ${SECONDS}s"
