#!/bin/bash
# One device call on nvidia-h200-x2 (#5), branch ll-lean-end: the LL all-reduce without its
# end-of-call fences and, for one row, without the counter (engine/distributed/ll_allreduce.py).
#   1. tests/gpu/test_ll_allreduce.py (self-check, 1000 mixed calls, graph replays)
#   2. bench/ll_allreduce.py: the LL sum and fused norm vs NCCL (+ norm) in CUDA graphs of 50 calls
#      (main, stop 13 on 2 H200s: LL sum 4.10 µs, fused 5.62 µs, NCCL + norm 8.30 µs at one row)
#   3. bench/parallel.py tp1,tp2 with kernel profiles (main, stop 14: TP=2 2.928 ms, 0.666x)
set -u
source bench/device/env.sh
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
timeout 120 python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_ll_allreduce.py > $L/test_ll.txt 2>&1
echo "test_ll_allreduce: $(grep -E 'passed|failed|error' $L/test_ll.txt | tail -1)"
grep -E "^(FAILED|ERROR)|^E " $L/test_ll.txt | head -6
timeout 90 python3 bench/ll_allreduce.py --out "$OUT/ll_allreduce.json" > $L/ll_allreduce.log 2>&1
tail -12 $L/ll_allreduce.log
timeout 200 python3 bench/parallel.py all --parts tp1,tp2 --budget-s 190 --profile-steps 30 \
    --out "$OUT/parallel.json" > $L/parallel.log 2>&1
python3 bench/device/parallel_summary.py "$OUT/parallel.json" --ranks 2 --rows 6
rm -rf "$OUT/parallel.logs"
tar -czf "$OUT/logs.tgz" -C /tmp logs
