#!/bin/bash
# One device call on nvidia-h100-x4: the custom one-shot all-reduce (issue #5's TP=2 decode
# target). Its GPU test and micro-benchmark, TP GPU tests with it on, then bench/parallel.py.
set -u
source bench/device/env.sh
timeout 90 python3 -m pytest -q -p no:cacheprovider -rA -s tests/gpu/test_custom_allreduce.py > $L/car_test.txt 2>&1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed|us" $L/car_test.txt | tail -15
timeout 60 python3 bench/custom_allreduce.py --out "$OUT/custom_allreduce.json" > $L/car_bench.log 2>&1
tail -8 $L/car_bench.log
timeout 150 python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_parallel_gpu.py \
    -k "llama-tp2 or llama-tp4 or 8b" > $L/parallel_tests.txt 2>&1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $L/parallel_tests.txt | tail -8
timeout "${BENCH_S:-185}" python3 bench/parallel.py all --budget-s "${BUDGET_S:-165}" --out "$OUT/parallel.json" \
    > $L/parallel_bench.log 2>&1
grep -E "median_step_ms|ratio|meets|output_tok_s" $L/parallel_bench.log | tail -12
cp -r "$OUT/parallel.logs" $L/ 2>/dev/null; rm -rf "$OUT/parallel.logs"
tar -czf "$OUT/logs.tgz" -C /tmp logs
ls "$OUT"
