#!/bin/bash
# One device call on nvidia-h200 (#5, stop 22): the MLP's gate_up GEMV with SiLU-and-mul as its
# epilogue (gemv_row_silu) vs two launches (KVMESH_GEMV_SILU=0): the kernel tests (bit-identity),
# then the TP=1 8B step and the TP=2 rank-shape step (bench/parallel_parts.rank_shape), each
# setting twice, alternating.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests kernels 200 tests/gpu/test_kernels.py
MD2=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-8b-rank-of-tp2', 2))")
for i in 1 2; do
  KVMESH_GEMV_SILU=0 decode_step tp1_two_$i 1 0
  decode_step tp1_fused_$i 1 0
  KVMESH_GEMV_SILU=0 decode_step rank_of_tp2_two_$i 1 0 "$MD2"
  decode_step rank_of_tp2_fused_$i 1 0 "$MD2"
done
