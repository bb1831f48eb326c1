#!/bin/bash
# One device call on nvidia-h100-x2 (#6, diagnosis): the LL all-reduce GPU tests (30 s), then
# bench/disagg_serve.py (mode ${MODE:-disaggregated} vs 2 colocated) with every process's step
# timeline on, and the client stall clusters attributed to the process that stalled.
set -u
source bench/device/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader | head -2
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_ll_allreduce.py > $L/ll_tests.txt 2>&1
tail -2 $L/ll_tests.txt
timeout "${SERVE_S:-420}" python3 bench/disagg_serve.py --model-shape llama8b --disagg-mode "${MODE:-disaggregated}" \
    --duration-s "${DURATION_S:-30}" --drain-s 10 --out "$OUT/disagg_serve.json" > $L/disagg_serve.log 2>&1
grep -E "ok in|steps; gap ms|stall clusters|^  t=|failed|Error" $L/disagg_serve.log | head -60
tail -14 $L/disagg_serve.log
gzip -9 "$OUT/disagg_serve.json"
tar -czf "$OUT/logs.tgz" -C /tmp logs
