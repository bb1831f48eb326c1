#!/bin/bash
# One device call on nvidia-h100-x1 (issue #4): TTFT / ITL through the HTTP server
# (bench/gpu_http_bench.py: kvmesh serve, concurrency 1, 16, 128, traced TTFT breakdown).
set -u
source bench/device/env.sh
timeout "${HTTP_S:-400}" python3 bench/gpu_http_bench.py --out "$OUT/gpu_http.json" > $L/gpu_http.log 2>&1
echo "gpu_http_bench rc=$?"
tail -30 $L/gpu_http.log
tar -czf "$OUT/http_logs.tgz" -C /tmp logs
