#!/bin/bash
# One device call on nvidia-h200-x4 (#5, stop 17 final): main's defaults (every Triton kernel and
# the LL all-reduce as programmatic dependent launches, KVMESH_PDL=1; pushing GEMV on):
#   1. bench/parallel.py, every part: all-reduce bandwidth at 2 and 4 ranks vs raw NCCL, and the
#      8B decode step at TP=1, 2, 4 (+ TP=1 x 2 vs TP=2 throughput), with kernel profiles
#   2. the same-call A/B: tp1,tp2 with KVMESH_PDL=triton (the LL call a plain launch)
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L  # logs come back even if the call runs out of time
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -4
timeout 260 python3 bench/parallel.py all --parts allreduce2,allreduce4,tp1,tp2,tp4 --budget-s 250 \
    --profile-steps 30 --num-requests 128 --out "$OUT/parallel.json" > $L/parallel.log 2>&1
python3 bench/device/parallel_summary.py "$OUT/parallel.json" --ranks 1 --rows 6
KVMESH_PDL=triton timeout 200 python3 bench/parallel.py all --parts tp1,tp2 --budget-s 190 --profile-steps 30 \
    --num-requests 64 --out "$OUT/parallel_pdl_triton.json" > $L/parallel_pdl_triton.log 2>&1
echo "== KVMESH_PDL=triton"
python3 bench/device/parallel_summary.py "$OUT/parallel_pdl_triton.json" --ranks 1 --rows 6
rm -rf "$OUT"/parallel*.logs
