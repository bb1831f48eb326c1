#!/bin/bash
# One device call on nvidia-h200 (#5, stop 24): the LL no-wait mode (KVMESH_LL_NO_WAIT: the
# pushing GEMV also fills my own slot and the LL call never waits for that GEMV to end), checked
# and timed on one GPU in the loopback harness, as only one-GPU machines were lent:
#   1. tests/gpu/test_ll_loopback.py (both modes, any issue order, 2 and 4 ranks)
#   2. bench/ll_chain.py: a TP=2 rank's layer chain, both ranks on this GPU, wait vs no-wait
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests ll_loopback 300 tests/gpu/test_ll_loopback.py
grep -E "^(FAILED|E )" $L/ll_loopback.txt | head -20
timeout 200 python3 bench/ll_chain.py --out $OUT/ll_chain_h200.json > $L/ll_chain.log 2>&1; echo "ll_chain rc $?"
tail -3 $L/ll_chain.log
