#!/bin/bash
# One device call on nvidia-h200-x2 (#5; written in stop 19, when only one-GPU machines were lent):
# the TP=2 A/B that bench/gemv_preload.py's one-GPU stand-in asks for.
#   1. the LL all-reduce and GEMV tests with both knobs on (KVMESH_LL_TRIGGER=wait: the kernel after
#      an LL call launches after the call's own wait; KVMESH_GEMV_PRELOAD=32768: a one-row GEMV
#      program loads 32 KiB of its rows before its wait)
#   2. the 8B-shape decode step at batch 1: TP=1 on GPU 0, then TP=2 per setting, in turn
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
KVMESH_LL_TRIGGER=wait KVMESH_GEMV_PRELOAD=32768 gpu_tests ll_and_gemv 200 \
    tests/gpu/test_ll_allreduce.py tests/gpu/test_kernels.py -k "ll or push or gemv or dependent"
decode_step tp1 1 0
for setting in ${SETTINGS:-start:0 wait:0 wait:32768 start:0 wait:0}; do
  KVMESH_LL_TRIGGER=${setting%%:*} KVMESH_GEMV_PRELOAD=${setting##*:} decode_step "tp2_${setting/:/_}" 2 0,1
done
tail -3 $L/tp2_start_0.err
