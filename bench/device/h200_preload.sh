#!/bin/bash
# One device call on nvidia-h200 (#5, stop 19; only single-GPU machines were lent): one-row GEMVs
# that load more than one weight tile before they wait (KVMESH_GEMV_PRELOAD, engine/kernels/gemv.py).
#   1. tests/gpu/test_kernels.py's GEMV tests with a 32 KiB preload (cuBLAS agreement, bit-identical
#      dependent launches, eager and in a CUDA graph)
#   2. bench/gemv_preload.py: one decoder layer's GEMV chain with stand-in kernels between the
#      GEMVs (TP=1 norms; TP=2's all-reduce as a spin, its dependents let go early or late)
#   3. the 8B-shape decode step at TP=1, batch 1, per KVMESH_GEMV_PRELOAD setting, in turn
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
KVMESH_GEMV_PRELOAD=32768 gpu_tests test_kernels 200 tests/gpu/test_kernels.py -k "gemv or dependent"
timeout 240 python3 bench/gemv_preload.py --out "$OUT/gemv_preload_h200.json" > $L/gemv_preload.log 2>&1
grep -v "^ " $L/gemv_preload.log | tail -12
for b in ${SETTINGS:-0 32768 65536 0 32768}; do
  KVMESH_GEMV_PRELOAD=$b decode_step "tp1_pre$b" 1 0
done
tail -3 $L/tp1_pre0.err
