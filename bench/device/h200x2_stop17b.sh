#!/bin/bash
# One device call on nvidia-h200-x2 (#5, stop 17, last; no 4-GPU machine was lent then): main's defaults after the tuner change
# (candidates timed in turn, best of 5 rounds each) and with each rank's tuning in the profile:
#   1. tests/gpu/test_kernels.py: the tuner test and the dependent-launch chains
#   2. bench/parallel.py, all-reduce bandwidth at 2 ranks vs raw NCCL, and the
#      8B decode step at TP=1, 2 (+ TP=1 x 2 vs TP=2 throughput), with kernel profiles
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L  # logs come back even if the call runs out of time
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
gpu_tests test_kernels 100 tests/gpu/test_kernels.py -k "tune or dependent"
timeout 270 python3 bench/parallel.py all --parts allreduce2,tp1,tp2 --budget-s 260 \
    --profile-steps 30 --num-requests 128 --out "$OUT/parallel.json" > $L/parallel.log 2>&1
python3 bench/device/parallel_summary.py "$OUT/parallel.json" --ranks 2 --rows 6
rm -rf "$OUT"/parallel*.logs
