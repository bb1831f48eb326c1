#!/bin/bash
# One device call on nvidia-h200 (#5, stop 22): the TP=2 (and TP=4) step's floor on ONE GPU. A
# model of one rank's shapes (bench/parallel_parts.rank_shape: heads, KV heads, FFN and vocab / tp)
# served at TP=1 runs that rank's GEMVs, attention and norms without the all-reduces; next to
# the whole 8B shape in the same call, each with a 10-step kernel profile.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
show_profile() {
  python3 - "$OUT/$1.json" <<'PY'
import json, sys
try:
    rank = json.load(open(sys.argv[1]))["decode"]["profile"]["ranks"][0]
except (ValueError, KeyError, IndexError):
    sys.exit()
print(f"  kernels {rank['kernel_us_per_step']:.0f} us/step; idle {rank.get('idle_us_per_step')}")
for row in rank["rows"][:10]:
    print(f"    {row['name'][:60]}: {row['us_per_step']:.1f} us x{row['calls_per_step']:.0f}")
print("  tuning", json.dumps(rank.get("gemv_tuning")))
PY
}
decode_step tp1 1 0 "" 10; show_profile tp1
MD2=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-8b-rank-of-tp2', 2))")
decode_step rank_of_tp2 1 0 "$MD2" 10; show_profile rank_of_tp2
MD4=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-8b-rank-of-tp4', 4))")
decode_step rank_of_tp4 1 0 "$MD4" 0
decode_step tp1_again 1 0 "" 0
