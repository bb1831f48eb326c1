#!/bin/bash
# One device call on nvidia-h200-x2 (#5), stop 16 call 1, run on branch next-gpu (= ll-lean-end +
# pdl-gemv, both merged since; KVMESH_PDL is on by default now):
#   1. GPU tests: the LL all-reduce (self-check, mixed calls, graph replays), the GEMV cases and
#      the PDL chain (eager and in a CUDA graph)
#   2. bench/ll_allreduce.py: LL sum / fused norm vs NCCL (+ norm) in CUDA graphs of 50 calls
#      (main, stop 13, 2 H200s: 4.10 / 5.62 / 8.30 µs at one row)
#   3. bench/parallel.py tp1,tp2 with KVMESH_PDL=0, then =1: decode step, kernel profiles and
#      the ranks' step-call skew (main, stop 15, 4 H200s: TP=1 4.443, TP=2 2.953 ms)
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L  # logs come back even if the call runs out of time
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
gpu_tests test_ll 120 tests/gpu/test_ll_allreduce.py
gpu_tests test_kernels 150 tests/gpu/test_kernels.py -k "gemv"
timeout 90 python3 bench/ll_allreduce.py --out "$OUT/ll_allreduce.json" > $L/ll_allreduce.log 2>&1
tail -12 $L/ll_allreduce.log
for pdl in 0 1; do
  KVMESH_PDL=$pdl timeout 180 python3 bench/parallel.py all --parts tp1,tp2 --budget-s 160 --profile-steps 30 \
      --num-requests 64 --out "$OUT/parallel_pdl$pdl.json" > $L/parallel_pdl$pdl.log 2>&1
  echo "== KVMESH_PDL=$pdl"
  python3 bench/device/parallel_summary.py "$OUT/parallel_pdl$pdl.json" --ranks 2 --rows 6
  rm -rf "$OUT/parallel_pdl$pdl.logs"
done

