#!/bin/bash
# One device call on nvidia-h200 (#5, stop 22): is stop 17's slow TP=2 replica at max load (9,586
# tok/s at 128 requests on 2 H200s, where one TP=1 engine gave 13,976 on one) the host path of a
# replica whose workers are Ray actors, or the all-reduces? On one GPU: 128 requests of 128 -> 128
# through the whole 8B with its worker in the engine's process (uni) and as a Ray actor (ray, the
# path every TP=2 replica takes), and one TP=2 rank's shapes as a Ray actor (a TP=2 rank's work
# and host path without any all-reduce); then the batch-1 step through the Ray actor.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
MD2=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-8b-rank-of-tp2', 2))")
maxload tp1_uni_128 1 0 128
BENCH_ARGS="--executor ray" maxload tp1_ray_128 1 0 128
BENCH_ARGS="--executor ray" maxload rank_of_tp2_ray_128 1 0 128 "$MD2"
BENCH_ARGS="--executor ray" decode_step tp1_ray_step 1 0
