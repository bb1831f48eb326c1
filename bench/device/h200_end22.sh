#!/bin/bash
# One device call on nvidia-h200 (#5, stop 22, last): after the host-path changes (sampling batch
# without per-step id copies; detokenizer through the Rust tokenizer): the engine GPU tests, the
# engine's host parts a step on this machine's CPU, and one TP=2 rank's shapes at 128 requests
# through a Ray worker (h200_hostpath.sh gave 6.490 ms steps before either change, 7.072 after the first).
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
MD2=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-8b-rank-of-tp2', 2))")
BENCH_ARGS="--executor ray" maxload rank_of_tp2_ray_128 1 0 128 "$MD2"
gpu_tests engine_gpu 120 -m "gpu and not multigpu and not multigpu4" tests/gpu/test_engine_gpu.py
CUDA_VISIBLE_DEVICES= timeout 60 python3 bench/host_step.py --out $OUT/host_step_h200_host.json | grep -A8 '"host_ms_per_step"'
