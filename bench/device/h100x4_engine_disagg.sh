#!/bin/bash
# One device call on nvidia-h100-x4, two lanes at once:
#   GPU 0     issue #4: bench/gpu_bench.py (kvmesh vs HF, same requests, one process), then the
#             HTTP TTFT/ITL bench (bench/gpu_http_bench.py)
#   GPUs 1,2  issue #6: NCCL disaggregation test, KV transfer vs raw NCCL (bench/disagg.py),
#             mixed workload disaggregated vs colocated through Serve (bench/disagg_serve.py)
set -u
source bench/device/env.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv > $L/nvidia_smi.txt 2>&1
(
  export CUDA_VISIBLE_DEVICES=0
  timeout "${BENCH_S:-330}" python3 bench/gpu_bench.py --max-num-seqs 512 --skip-hf-mixed-dynamic --ttft-profile \
      --profile-dir $L --out "$OUT/gpu_bench.json" > $L/gpu_bench.log 2>&1
  timeout "${HTTP_S:-210}" python3 bench/gpu_http_bench.py --out "$OUT/gpu_http.json" > $L/gpu_http.log 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=1,2
  timeout 100 python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_disagg_gpu.py > $L/disagg_tests.txt 2>&1
  timeout 80 python3 bench/disagg.py --transport nccl --out "$OUT/disagg_kv.json" > $L/disagg_kv.log 2>&1
  timeout "${SERVE_S:-330}" python3 bench/disagg_serve.py --model-shape llama8b ${SERVE_ARGS:-} \
      --out "$OUT/disagg_serve.json" > $L/disagg_serve.log 2>&1
) &
wait
grep -E "passed|failed" $L/disagg_tests.txt | tail -3
grep "\[gpu_bench\]" $L/gpu_bench.log | tail -20
tail -5 $L/gpu_http.log $L/disagg_kv.log $L/disagg_serve.log
tar -czf "$OUT/logs.tgz" -C /tmp logs
ls -la "$OUT"
