#!/bin/bash
# One device call on nvidia-h100-x4: GPU 0 the HTTP TTFT/ITL bench (#4), GPUs 2,3 disaggregated
# vs colocated serving (#6), at the same time.
set -u
source bench/device/env.sh
( export CUDA_VISIBLE_DEVICES=0
  timeout 250 python3 bench/gpu_http_bench.py --out "$OUT/gpu_http.json" > $L/gpu_http.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=2,3
  timeout 280 python3 bench/disagg_serve.py --model-shape llama8b --disagg-mode disaggregated \
      --duration-s "${DURATION_S:-30}" --drain-s 10 --out "$OUT/disagg_serve.json" > $L/disagg_serve.log 2>&1 ) &
wait
grep -A4 "^concurrency" $L/gpu_http.log
tail -20 $L/disagg_serve.log
tar -czf "$OUT/logs.tgz" -C /tmp logs
