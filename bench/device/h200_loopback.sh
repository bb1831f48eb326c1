#!/bin/bash
# One device call on nvidia-h200 (#5, stop 20): the LL all-reduce with every rank a thread of one
# process on one GPU (bench/ll_loopback.py), as only one-GPU machines were lent.
#   1. tests/gpu/test_ll_loopback.py: same bits on every rank and the reference (2 and 4 ranks),
#      the pushing GEMV, the stamps (KVMESH_LL_STAMPS)
#   2. bench/ll_loopback.py: 2000 fused calls of one 4096 row, back to back, eager: where a call's
#      time goes without NVLink (2 and 4 ranks)
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests ll_loopback 280 tests/gpu/test_ll_loopback.py
for r in 2 4; do
  timeout 100 python3 bench/ll_loopback.py --ranks $r --out $OUT/ll_loopback_r$r.json > $L/ll_loopback_r$r.log 2>&1
  tail -4 $L/ll_loopback_r$r.log
done
grep -E "^(FAILED|E )" $L/ll_loopback.txt | head -20
