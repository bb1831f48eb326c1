#!/bin/bash
# One device call on nvidia-h200 (#5, stop 23): what the small kernels of the batch-1 step cost,
# each taken out in turn (bench/step_parts.py), for one TP=2 rank's shapes and the whole 8B.
# h200_gap23.sh showed the batch-1 step is device-bound (host gap 0.013-0.016 ms), and its graph
# (the layers) 3.687 ms whole / 2.161 ms for a TP=2 rank.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
MD2=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-8b-rank-of-tp2', 2))")
MD=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-llama8b-shape'))")
echo "one TP=2 rank's shapes:"
timeout 330 python3 bench/step_parts.py --model-dir "$MD2" --out $OUT/step_parts_rank_of_tp2.json 2> $L/rank.err
echo "whole 8B:"
timeout 200 python3 bench/step_parts.py --model-dir "$MD" --variants none,all --out $OUT/step_parts_whole.json 2> $L/whole.err
