#!/bin/bash
# Fourth device call on nvidia-h200-x2 (#5, stop 26): the batch-1 decode step again with the final
# defaults, on whatever 2-GPU host this lease gives: TP=1 (GPU 0) and TP=2 (GPUs 0-1), in turn,
# twice. The first two calls gave 0.598x / 0.597x and 0.598x.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
decode_step tp1 1 0
decode_step tp2 2 0,1
decode_step tp1_again 1 0
decode_step tp2_again 2 0,1
echo "done at ${SECONDS}s"
