#!/bin/bash
# One device call on nvidia-h200 (#5, stop 23, last): the driver's host parts after this stop's
# output-processing and RunnerMirror changes, for one TP=2 rank's shapes at 128 requests:
# bench/host_step.py --model-dir (h200_gap23.sh, before them: 5.763 ms steps, output processing
# 3.549, schedule 0.461), then the same shapes through a Ray worker at max load (stop 22's
# h200_end22.sh: 20,063 tok/s, 4.896 ms full-batch steps).
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
MD2=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-8b-rank-of-tp2', 2))")
timeout 120 python3 bench/host_step.py --model-dir "$MD2" --num-requests 128 --out $OUT/host_step_rank_of_tp2_128.json > $L/host_step.out 2>&1
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('host_step rank_of_tp2 n=128: step', r['step_ms'], r['host_ms_per_step'])" $OUT/host_step_rank_of_tp2_128.json
BENCH_ARGS="--executor ray" maxload rank_of_tp2_ray_128 1 0 128 "$MD2"
