#!/bin/bash
# One device call on nvidia-h200 (#5, stop 20; only single-GPU machines were lent): one-row GEMVs
# that ask the L2 to prefetch weight slabs before their PDL wait (KVMESH_GEMV_PREFETCH,
# engine/kernels/gemv.py), so HBM streams while the kernel before them still runs.
#   1. tests/gpu/test_kernels.py's GEMV tests with 2 slabs a program (cuBLAS agreement,
#      bit-identical dependent launches, eager and in a CUDA graph)
#   2. bench/gemv_preload.py: one decoder layer's GEMV chain with stand-in gaps (TP=1 norms;
#      TP=2's all-reduce as a 5 µs spin), per preload / prefetch variant
#   3. the 8B-shape decode step at TP=1, batch 1, per KVMESH_GEMV_PREFETCH setting, in turn
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
KVMESH_GEMV_PREFETCH=2 gpu_tests test_kernels 200 tests/gpu/test_kernels.py -k "gemv or dependent"
echo "tests done at ${SECONDS}s"
timeout 200 python3 bench/gemv_preload.py --ll-ns ${LL_NS:-0,5000} \
  --variants ${VARIANTS:-pre=0,pf=1x4,pf=2x4,pf=4x4,pf=2x8,pf=8x2} --out "$OUT/gemv_prefetch_h200.json" \
  > $L/gemv_prefetch.log 2>&1
grep -v "^ " $L/gemv_prefetch.log | tail -12
echo "stand-in done at ${SECONDS}s"
for s in ${SETTINGS:-0 2 4 0 2}; do
  [ $SECONDS -lt 500 ] || { echo "skipping prefetch $s: ${SECONDS}s"; continue; }
  KVMESH_GEMV_PREFETCH=$s decode_step "tp1_pf$s" 1 0
  echo "  at ${SECONDS}s"
done
tail -3 $L/tp1_pf0.err
