#!/bin/bash
# One device call on nvidia-h200 (#5, stop 23): the fused decode reduce (the last split of each
# (request, KV head) merges the splits; engine/attention/triton_kernels.py). h200_parts23.sh
# showed decode attention (split kernel + reduce) costs a TP=2 rank's batch-1 graph 219 us of
# 2.178 ms. A/B in one call (KVMESH_DISABLE_FUSED_DECODE_REDUCE=1: the reduce launch), then the
# attention and engine GPU tests with it on. It ran at 6ffc337: 0.10-0.12 ms a step SLOWER
# (TP=1 4.039 vs 3.938 ms, a TP=2 rank 2.394 vs 2.272), so the change was reverted (158fb84).
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
MD2=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-8b-rank-of-tp2', 2))")
decode_step tp1_fused 1 0
KVMESH_DISABLE_FUSED_DECODE_REDUCE=1 decode_step tp1_two_launches 1 0
decode_step rank_of_tp2_fused 1 0 "$MD2"
KVMESH_DISABLE_FUSED_DECODE_REDUCE=1 decode_step rank_of_tp2_two_launches 1 0 "$MD2"
gpu_tests attention 200 -m "gpu and not multigpu and not multigpu4" tests/gpu/test_triton_attention.py
gpu_tests engine_gpu 150 -m "gpu and not multigpu and not multigpu4" tests/gpu/test_engine_gpu.py
