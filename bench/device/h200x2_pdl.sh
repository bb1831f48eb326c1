#!/bin/bash
# One device call on nvidia-h200-x2 (#5, stop 17): every small per-token kernel as a programmatic
# dependent launch (engine/kernels/pdl.py), and where a TP=2 step's host time goes.
#   1. tests/gpu/test_kernels.py: the dependent-launch chains (norm, GEMV, SiLU-and-mul; rotary +
#      KV store, decode attention, reduce) bit-identical to plain launches; the GEMV cases
#   2. tests/gpu/test_ll_allreduce.py (2 ranks): stop 16's review fixes (gemv_push's shape check,
#      _push_config) had not run on a GPU
#   3. bench/parallel.py tp1,tp2 with KVMESH_PDL=gemv (stop 16's setting) and =1 (all kernels):
#      decode step, kernel profiles with host CUDA calls, and the workers' launch / wait split
#   4. tests/gpu/test_parallel_gpu.py: TP=2 tiny vs one GPU, and the 8B shape at TP=2 (PDL on)
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L  # logs come back even if the call runs out of time
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
gpu_tests test_kernels 150 tests/gpu/test_kernels.py -k "dependent or gemv"
gpu_tests test_ll 150 tests/gpu/test_ll_allreduce.py -k "not four"
for pdl in gemv 1; do
  KVMESH_PDL=$pdl timeout 150 python3 bench/parallel.py all --parts tp1,tp2 --budget-s 140 --profile-steps 30 \
      --num-requests 64 --out "$OUT/parallel_pdl_$pdl.json" > $L/parallel_pdl_$pdl.log 2>&1
  echo "== KVMESH_PDL=$pdl"
  python3 bench/device/parallel_summary.py "$OUT/parallel_pdl_$pdl.json" --ranks 2 --rows 8 --idle-before
done
rm -rf "$OUT"/parallel_*.logs
gpu_tests test_parallel 150 tests/gpu/test_parallel_gpu.py -k "llama-tp2 or 8b_shape_serves_at_tp and 2"
