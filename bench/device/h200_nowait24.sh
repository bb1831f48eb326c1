#!/bin/bash
# One device call on nvidia-h200 (#5, stop 24): the LL no-wait mode (KVMESH_LL_NO_WAIT: the
# pushing GEMV also fills my own slot and the LL call never waits for that GEMV to end), checked
# on one GPU in the loopback harness (both modes, any issue order, 2 and 4 ranks), as only
# one-GPU machines were lent. The file's child run directly (-v), so a hang shows where.
# (This stop's first call also ran a loopback layer chain, bench/ll_chain.py, since removed: it
# and this file hung, the chain because a rank's first kernel load waited for the other rank's
# spinning LL call; the test's rank-after-rank order had the same flaw, now warmed first.)
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
CUDA_MODULE_LOADING=EAGER KVMESH_LOOPBACK_CHILD=1 timeout 240 python3 -m pytest -v -p no:cacheprovider -x \
  tests/gpu/test_ll_loopback.py > $L/ll_loopback.txt 2>&1; echo "rc $?"
grep -E "PASSED|FAILED|ERROR|passed|failed" $L/ll_loopback.txt | tail -20
