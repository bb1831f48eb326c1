#!/bin/bash
# The short form of h200x2_nowait24.sh for a call with about 300 s of device time left (#5,
# stop 24): the 8B-shape batch-1 decode step, TP=2 on GPUs 0-1 waiting as before and with
# no-wait + signal, then TP=1 on GPU 0, then (time allowing) the LL all-reduce's two-rank test
# with no-wait + signal on (NVLink).
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
KVMESH_LL_NO_WAIT=0 decode_step tp2_wait 2 0,1
KVMESH_LL_NO_WAIT=1 KVMESH_LL_SIGNAL=1 decode_step tp2_signal 2 0,1
decode_step tp1 1 0
echo "steps done at ${SECONDS}s"
[ $SECONDS -lt 200 ] && KVMESH_LL_NO_WAIT=1 KVMESH_LL_SIGNAL=1 gpu_tests ll_allreduce_signal 80 tests/gpu/test_ll_allreduce.py::test_two_ranks
echo "done at ${SECONDS}s"
