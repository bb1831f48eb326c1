#!/bin/bash
# One device call on nvidia-h100-x4, two lanes at once:
#   GPUs 0,1  #6: bench/disagg_serve.py, mode auto (1 prefill + 1 decode) vs 2 colocated
#   GPUs 2,3  the GPU test suite (markers gpu and multigpu; multigpu4 skips on 2 visible GPUs)
set -u
source bench/device/env.sh
( export CUDA_VISIBLE_DEVICES=0,1
  timeout "${SERVE_S:-330}" python3 bench/disagg_serve.py --model-shape llama8b --disagg-mode "${MODE:-auto}" \
      --duration-s "${DURATION_S:-30}" --drain-s 10 --out "$OUT/disagg_serve.json" > $L/disagg_serve.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=2,3
  timeout "${TEST_S:-330}" python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu > $L/gpu_tests.txt 2>&1 ) &
wait
tail -22 $L/disagg_serve.log
grep -E "^(FAILED|ERROR)|passed|failed" $L/gpu_tests.txt | tail -12
tar -czf "$OUT/logs.tgz" -C /tmp logs
