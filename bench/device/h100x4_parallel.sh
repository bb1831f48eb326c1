#!/bin/bash
# One device call on nvidia-h100-x4: replica GPU groups (issue #5). GPU tests of TP/PP/EP over
# NCCL on 2 and 4 GPUs, then bench/parallel.py (all-reduce, decode step TP=1/2/4, TP=1x2 vs TP=2x1).
set -u
source bench/device/env.sh
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv; nvidia-smi topo -m; } > "$OUT/nvidia_smi.txt" 2>&1
timeout "${TEST_S:-270}" python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_parallel_gpu.py \
    > "$OUT/parallel_tests.txt" 2>&1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/parallel_tests.txt" | tail -20
timeout "${BENCH_S:-300}" python3 bench/parallel.py all --budget-s "${BUDGET_S:-280}" --out "$OUT/parallel.json" \
    > "$OUT/parallel_bench.log" 2>&1
tail -40 "$OUT/parallel_bench.log"
tar -czf "$OUT/parallel_logs.tgz" -C "$OUT" parallel.logs 2>/dev/null && rm -rf "$OUT/parallel.logs"
ls "$OUT"
