#!/bin/bash
# The short form of h200x2_nowait24.sh for a call with about 300 s of device time left (#5,
# stop 24): the LL all-reduce's two-rank test with no-wait + signal on (NVLink), then the
# 8B-shape batch-1 decode step: TP=1 on GPU 0, TP=2 waiting as before, TP=2 no-wait + signal.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
KVMESH_LL_NO_WAIT=1 KVMESH_LL_SIGNAL=1 gpu_tests ll_allreduce_signal 120 tests/gpu/test_ll_allreduce.py::test_two_ranks
decode_step tp1 1 0
KVMESH_LL_NO_WAIT=0 decode_step tp2_wait 2 0,1
KVMESH_LL_NO_WAIT=1 KVMESH_LL_SIGNAL=1 decode_step tp2_signal 2 0,1
echo "done at ${SECONDS}s"
