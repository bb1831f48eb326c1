#!/bin/bash
# One device call on nvidia-h200-x2 (#6 with this stop's changes: the channel mailbox, the stacked
# KV cache's one-launch scatter, no mid-serving Triton compiles, the 4-process load client):
#   1. the GPU tests touched this stop, one pytest process per file (a CUDA fault in one file
#      must not fail the others), and the 2-GPU NCCL disaggregation equality test
#   2. bench/disagg_serve.py, mode ${MODE:-disaggregated} vs 2 colocated, timelines on
#      (OVERLAP=1: with --overlap-prefill, the reservation alongside the prefill)
set -u
source bench/device/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader | head -2
for f in ${TESTS:-test_rope_store test_no_recompile test_engine_gpu test_disagg_gpu}; do
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/$f.py > $L/$f.txt 2>&1
  echo "$f: $(grep -E 'passed|failed|error' $L/$f.txt | tail -1)"
  grep -E "^(FAILED|ERROR)" $L/$f.txt | head -5
done
timeout "${SERVE_S:-400}" python3 bench/disagg_serve.py --model-shape llama8b --disagg-mode "${MODE:-disaggregated}" \
    --duration-s "${DURATION_S:-30}" --drain-s 10 ${OVERLAP:+--overlap-prefill} --out "$OUT/disagg_serve.json" > $L/disagg_serve.log 2>&1
grep -E "ok in|steps; gap ms|stall clusters|failed|Error" $L/disagg_serve.log | head -30
tail -16 $L/disagg_serve.log
gzip -9 "$OUT/disagg_serve.json"
tar -czf "$OUT/logs.tgz" -C /tmp logs
