#!/bin/bash
# One device call on nvidia-h200-x2 (#5): the row-parallel GEMV that pushes its outputs to the
# peer for the LL all-reduce (gemv.gemv_row_push, LLAllReduce.gemv_push; KVMESH_LL_PUSH=0: off).
#   1. tests/gpu/test_ll_allreduce.py (2 ranks; now with the pushed calls: bit-identical to the
#      plain path, single, 300 back to back, and a CUDA graph) and the one-row GEMV cases (PDL chain included)
#   2. bench/ll_allreduce.py: a 4096x7168 GEMV + the fused LL call, pushing and not
#   3. bench/parallel.py tp1,tp2 (push on) with the one-row GEMVs as dependent launches
#      (KVMESH_PDL=1, the default) and without (earlier call, PDL off: TP=1 4.312 ms, TP=2
#      2.799 ms with push, 2.837 ms without)
#   4. tests/gpu/test_parallel_gpu.py: TP=2 tiny vs one GPU, and the 8B shape at TP=2
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L  # logs come back even if the call runs out of time
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
gpu_tests test_ll 150 tests/gpu/test_ll_allreduce.py -k "not four"
gpu_tests test_kernels 100 tests/gpu/test_kernels.py -k "gemv"
timeout 90 python3 bench/ll_allreduce.py --out "$OUT/ll_allreduce.json" > $L/ll_allreduce.log 2>&1
grep "ranks:" $L/ll_allreduce.log | head -2
for pdl in 1 0; do
  KVMESH_PDL=$pdl timeout 150 python3 bench/parallel.py all --parts tp1,tp2 --budget-s 140 --profile-steps 30 \
      --num-requests 64 --out "$OUT/parallel_pdl$pdl.json" > $L/parallel_pdl$pdl.log 2>&1
  echo "== push on, KVMESH_PDL=$pdl"
  python3 bench/device/parallel_summary.py "$OUT/parallel_pdl$pdl.json" --ranks 2 --rows 7
done
rm -rf "$OUT"/parallel_*.logs
gpu_tests test_parallel 150 tests/gpu/test_parallel_gpu.py -k "llama-tp2 or 8b_shape_serves_at_tp and 2"
