#!/bin/bash
# One device call on nvidia-h200 (#5, stop 20): the LL all-reduce with every rank in one process on
# one GPU (bench/ll_loopback.py), as only one-GPU machines were lent.
#   1. tests/gpu/test_ll_loopback.py: same bits on every rank and the reference (2 and 4 ranks),
#      the pushing GEMV, the stamps (KVMESH_LL_STAMPS)
#   2. bench/ll_loopback.py: 2000 fused calls of one 4096 row per rank, issued rank after rank:
#      the stamps of the rank issued last (its peers' lines already in) are the kernel's own
#      cost; KVMESH_LL_BATCH=0 (each peer loaded in its turn) then 1 (default: every peer's first load issued at once), 2 and 4 ranks
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests ll_loopback 280 tests/gpu/test_ll_loopback.py
grep -E "^(FAILED|E )" $L/ll_loopback.txt | head -20
for r in 2 4; do
  for early in 0 1; do
    KVMESH_LL_BATCH=$early timeout 100 python3 bench/ll_loopback.py --ranks $r \
      --out $OUT/ll_loopback_r${r}_batch$early.json > $L/ll_loopback_r${r}_batch$early.log 2>&1
    echo "ranks $r batch $early: $(grep '"issued": "last"' $L/ll_loopback_r${r}_batch$early.log | cut -c1-400)"
    grep -E "Error|error" $L/ll_loopback_r${r}_batch$early.log | tail -2
  done
done
