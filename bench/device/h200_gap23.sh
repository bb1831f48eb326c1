#!/bin/bash
# One device call on nvidia-h200 (#5, stop 23): does the batch-1 step wait for the host? Stop 22's
# floor profile (h200_floor.sh) showed ~0.56 ms a step of device idle for one TP=2 rank's shapes
# (0.45 ms before the step's host->device copy) against ~0.15 ms for the whole 8B. Here: the
# engine's step next to its device work alone (parallel_parts.device_only_step: the batch-1 graph
# and LM head replayed back to back), the host parts of a batch-1 step on this machine
# (bench/host_step.py --model-dir), and the GPU test that had a stale monkeypatch until c41a2fe.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
decode_step tp1 1 0
MD2=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-8b-rank-of-tp2', 2))")
decode_step rank_of_tp2 1 0 "$MD2"
for n in 1 128; do
  for tag in "whole:$MD" "rank_of_tp2:$MD2"; do
    timeout 150 python3 bench/host_step.py --model-dir "${tag#*:}" --num-requests $n --out $OUT/host_step_${tag%%:*}_$n.json \
      > $L/host_step_${tag%%:*}_$n.out 2>&1
    echo "host_step ${tag%%:*} n=$n"; python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(' step', r['step_ms'], r['host_ms_per_step'])" $OUT/host_step_${tag%%:*}_$n.json 2>&1 | tail -1
  done
  [ $n = 1 ] && gpu_tests rope_store 200 -m "gpu and not multigpu and not multigpu4" tests/gpu/test_rope_store.py
done
