#!/bin/bash
# One device call on nvidia-h100-x1 (issue #4): GPU engine tests, then bench/gpu_bench.py whole
# (copy bandwidth, kvmesh engine incl. fresh-prompt TTFT and decode profiles, HF static/dynamic on
# the same requests) in one process. If the engine part fails with prefill CUDA graphs on, it is
# run again with them off (GRAPH_PREFILL_TOKENS=0), and the log says so.
set -u
source bench/device/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $L/nvidia_smi.txt
timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_engine_gpu.py \
    > $L/gpu_tests.txt 2>&1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $L/gpu_tests.txt | tail -12
timeout "${BENCH_S:-400}" python3 bench/gpu_bench.py --max-num-seqs 512 --skip-hf-mixed-dynamic \
    --graph-prefill-tokens "${GRAPH_PREFILL_TOKENS:-512}" --decode-profile --profile-dir $L \
    --out "$OUT/gpu_bench.json" > $L/gpu_bench.log 2>&1
echo "gpu_bench rc=$?"
grep "\[gpu_bench\]" $L/gpu_bench.log | tail -24
grep -iE "error|traceback" $L/gpu_bench.log | head -5
head -3 $L/profile_b1.txt 2>/dev/null
tar -czf "$OUT/logs.tgz" -C /tmp logs
