#!/bin/bash
# One device call on nvidia-h200 (#5, stop 20): where a TP=1 step goes at max load. The 8B shape
# (dummy weights), 64 then 128 requests of 128 -> 128 tokens queued at once (bench/parallel.py
# engine --throughput-requests), each its own engine: output tok/s, the wall time of the
# full-batch decode steps, and a kernel profile of 10 such steps (warm-up run) to set the
# device's time against it. Stop 17 measured TP=1 x 2 replicas (64 each) at 18,595 tok/s and one
# TP=2 replica (128) at 9,586 on 2 H200s; this asks whether one GPU's step at 128 is bound by
# the device or by the host.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
for n in ${REQUESTS:-64 128}; do
  maxload "maxload_tp1_n$n" 1 0 $n
  echo "  at ${SECONDS}s"
done
tail -3 $L/maxload_tp1_n64.err
