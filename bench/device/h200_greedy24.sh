#!/bin/bash
# One device call on nvidia-h200 (#5, stop 24): the TP greedy path's Triton launches
# (engine/sampler.py: shard_greedy_table, pick_greedy) against argmax on one H200, with the
# other greedy-argmax tests.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests kernels_greedy 200 tests/gpu/test_kernels.py -k "greedy"
