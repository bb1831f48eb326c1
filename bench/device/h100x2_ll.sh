#!/bin/bash
# One device call on nvidia-h100-x2 (#5): the LL all-reduce's GPU tests and latency table, then
# bench/parallel.py tp1,tp2 with per-rank kernel profiles (the LL path is on by default), then the
# TP=2 GPU equality tests and the 8B-shape TP=2 serve test.
set -u
source bench/device/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader | head -2
timeout "${LLT_S:-120}" python3 -m pytest -q -x -s -p no:cacheprovider tests/gpu/test_ll_allreduce.py > $L/ll_tests.txt 2>&1
tail -30 $L/ll_tests.txt
timeout 60 python3 bench/ll_allreduce.py --out "$OUT/ll_allreduce.json" > $L/ll_bench.log 2>&1; tail -3 $L/ll_bench.log
timeout "${PAR_S:-240}" python3 bench/parallel.py all --parts tp1,tp2 --budget-s "${PAR_BUDGET_S:-230}" \
    --profile-steps 30 --out "$OUT/parallel.json" > $L/parallel.log 2>&1
python3 bench/device/parallel_summary.py "$OUT/parallel.json" --idle-before
grep -i "all-reduce\|LL " $L/parallel.log | head -5
timeout "${PT_S:-150}" python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_parallel_gpu.py \
    -k "two_gpus or 8b_shape_serves_at_tp" > $L/parallel_tests.txt 2>&1
grep -E "^(FAILED|ERROR|PASSED)|passed|failed|Error" $L/parallel_tests.txt | tail -12
tar -czf "$OUT/logs.tgz" -C /tmp logs
