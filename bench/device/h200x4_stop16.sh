#!/bin/bash
# One device call on nvidia-h200-x4 (#5), main with the lean LL kernel, the pushing row-parallel
# GEMV (KVMESH_LL_PUSH) and the one-row GEMVs as dependent launches (KVMESH_PDL), both on:
#   1. bench/parallel.py, every part: all-reduce bandwidth at 2 and 4 ranks vs raw NCCL, and the
#      8B decode step at TP=1, 2, 4 (+ TP=1 x 2 vs TP=2 throughput), with kernel profiles
#   2. tests/gpu/test_ll_allreduce.py at 2 and 4 ranks (the pushed calls included)
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L  # logs come back even if the call runs out of time
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -4
timeout 250 python3 bench/parallel.py all --parts allreduce2,allreduce4,tp1,tp2,tp4 --budget-s 240 \
    --profile-steps 30 --num-requests 128 --out "$OUT/parallel.json" > $L/parallel.log 2>&1
python3 bench/device/parallel_summary.py "$OUT/parallel.json" --ranks 1 --rows 6
rm -rf "$OUT/parallel.logs"
gpu_tests test_ll 120 tests/gpu/test_ll_allreduce.py
