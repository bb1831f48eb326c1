#!/bin/bash
# One device call on nvidia-h100-x1 (see bench/device/README.md): GPU engine tests, then the
# engine half of bench/gpu_bench.py with a profile of decode steps. Results land in $OUT.
set -u
source bench/device/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.txt"
timeout 230 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_engine_gpu.py \
    tests/gpu/test_triton_attention.py tests/gpu/test_kernels.py > "$OUT/gpu_tests.txt" 2>&1
tail -5 "$OUT/gpu_tests.txt"
timeout 330 python3 bench/gpu_bench.py --parts copy,engine --max-num-seqs "${MAX_NUM_SEQS:-512}" \
    --out "$OUT/gpu_bench_engine.json" --profile-dir "$OUT" --decode-profile 2>&1 | grep -v "it/s" | tail -25
