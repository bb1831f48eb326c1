#!/bin/bash
# One device call on nvidia-h100-x2 (#6): bench/disagg_serve.py, mode disaggregated (every prompt
# through the prefill pool: the decode replica runs decode steps only) vs 2 colocated replicas.
set -u
source bench/device/env.sh
timeout "${SERVE_S:-400}" python3 bench/disagg_serve.py --model-shape llama8b --disagg-mode "${MODE:-disaggregated}" \
    --duration-s "${DURATION_S:-30}" --drain-s 10 --out "$OUT/disagg_serve.json" > $L/disagg_serve.log 2>&1
tail -24 $L/disagg_serve.log
tar -czf "$OUT/logs.tgz" -C /tmp logs
