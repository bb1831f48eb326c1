#!/bin/bash
# One device call on nvidia-h200-x4 (#5, stop 17): the LL all-reduce as a programmatic dependent
# launch too (cuLaunchKernelEx through ctypes, engine/kernels/pdl.py; KVMESH_PDL=1), against
# KVMESH_PDL=triton (every Triton kernel, not the LL call: call 1's "all"):
#   1. tests/gpu/test_ll_allreduce.py at 2 and 4 ranks (each rank also checks that its calls were
#      dependent launches), test_kernels' dependent-launch chains, test_engine_gpu (the Triton
#      backend and CUDA graphs vs the reference backend, async vs sync) with PDL on
#   2. bench/parallel.py tp1,tp2, KVMESH_PDL=triton then =1: decode step, profiles, host split
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L  # logs come back even if the call runs out of time
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -4
gpu_tests test_ll 120 tests/gpu/test_ll_allreduce.py
gpu_tests test_kernels 100 tests/gpu/test_kernels.py -k dependent
for pdl in triton 1; do
  KVMESH_PDL=$pdl timeout 140 python3 bench/parallel.py all --parts tp1,tp2 --budget-s 130 --profile-steps 30 \
      --num-requests 64 --out "$OUT/parallel_pdl_$pdl.json" > $L/parallel_pdl_$pdl.log 2>&1
  echo "== KVMESH_PDL=$pdl"
  python3 bench/device/parallel_summary.py "$OUT/parallel_pdl_$pdl.json" --ranks 2 --rows 8 --idle-before
done
rm -rf "$OUT"/parallel_*.logs
gpu_tests test_engine 130 tests/gpu/test_engine_gpu.py
