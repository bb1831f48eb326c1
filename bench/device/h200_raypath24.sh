#!/bin/bash
# One device call on nvidia-h200 (#5, stop 24): where a step's time goes at max load when the
# runner is in a Ray worker (as in a TP=2 replica) against in one process, one TP=2 rank's
# shapes, 128 requests: bench/host_step.py --model-dir, then with --executor ray (the driver's
# parts and the worker's step stamps), then the tok/s at max load through the Ray worker (stop
# 23: 15,602 tok/s, 6.56 ms full-batch steps; in one process 3.96 ms steps).
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
MD2=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-8b-rank-of-tp2', 2))")
show() { python3 -c "
import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], 'step', r['step_ms'], 'ms;', r['host_ms_per_step'])
s=r.get('rank_skew')
if s: print('  worker', {k: v['median'] for k, v in s['ranks'][0].items() if isinstance(v, dict)}, 'turnaround', s['turnaround_us'])
" "$1" "$2"; }
timeout 150 python3 bench/host_step.py --model-dir "$MD2" --num-requests 128 --out $OUT/host_inproc.json > $L/host_inproc.out 2>&1
show $OUT/host_inproc.json in-process
timeout 200 python3 bench/host_step.py --model-dir "$MD2" --num-requests 128 --executor ray --out $OUT/host_ray.json > $L/host_ray.out 2>&1
show $OUT/host_ray.json ray-worker
tail -3 $L/host_ray.out | cut -c1-300
BENCH_ARGS="--executor ray" maxload rank_of_tp2_ray_128 1 0 128 "$MD2"
