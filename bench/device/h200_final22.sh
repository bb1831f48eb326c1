#!/bin/bash
# One device call on nvidia-h200 (#5, stop 22, end of stop): main after gemv_tune's copies change
# (the weight itself is one of its timing copies; empty_cache after tuning): the single-GPU
# kernel, engine and no-recompile tests, then the TP=1 8B step and the TP=2 rank-shape floor.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests single_gpu 330 -m "gpu and not multigpu and not multigpu4" tests/gpu/test_kernels.py \
    tests/gpu/test_engine_gpu.py tests/gpu/test_no_recompile.py
decode_step tp1 1 0
MD2=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-8b-rank-of-tp2', 2))")
decode_step rank_of_tp2 1 0 "$MD2"
