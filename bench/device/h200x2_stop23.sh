#!/bin/bash
# One device call on nvidia-h200-x2 (#5, stop 23; ~13 min of device time left): the 8B-shape decode
# step at batch 1, TP=1 on GPU 0 and TP=2 on GPUs 0-1, twice each, the first TP=2 measurement since
# stop 17 (2.627 vs 3.946 ms, 0.666x), with stops 20-22's changes (pushing GEMV's early reads, LM
# head GEMV, host fixes); then, as time allows, max load: one TP=2 replica at 128 requests and
# TP=1 at 64 requests on GPU 0 (the 2 x TP=1 comparison's one replica).
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
decode_step tp1 1 0
decode_step tp2 2 0,1
decode_step tp1_again 1 0
decode_step tp2_again 2 0,1
echo "decode steps done at ${SECONDS}s"
[ $SECONDS -lt 300 ] && maxload maxload_tp2_n128 2 0,1 128
[ $SECONDS -lt 420 ] && maxload maxload_tp1_n64 1 0 64
tail -3 $L/tp2.err
