#!/bin/bash
# One device call on nvidia-h200 (#5, stop 22), after h200_hostpath.sh found one TP=2 rank's
# shapes at 128 requests host-bound through a Ray worker (6.49 ms steps, 3.6 ms of kernels):
# the engine's host parts a step on this machine's CPU (bench/host_step.py, model on the CPU),
# then that rank's shapes with the worker in the engine's process (uni) and as a Ray actor, with
# the sampling batch no longer copying every request's prompt and output ids each step.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
CUDA_VISIBLE_DEVICES= timeout 120 python3 bench/host_step.py --out $OUT/host_step_h200_host.json | tail -12
MD2=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-8b-rank-of-tp2', 2))")
maxload rank_of_tp2_uni_128 1 0 128 "$MD2"
BENCH_ARGS="--executor ray" maxload rank_of_tp2_ray_128 1 0 128 "$MD2"
