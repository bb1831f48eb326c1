#!/bin/bash
# One device call on nvidia-h200-x2 (#5, stop 26): does the one-row GEMV's tile config, picked by
# Triton's autotuner per rank and run (stop 23's TP=2 ranks: o_proj 5.26 against 4.44 µs a
# call), explain the 0.04-0.08 ms spread of TP=2's batch-1 step, and does timing every config in
# CUDA graphs (gemv_tune._sweep_row_configs, now the default) take it away?
#   the tuner's GPU test; TP=1; TP=2 with the autotuner's picks (KVMESH_GEMV_ROW_SWEEP=0) and
#   with the sweep, interleaved twice; TP=1 again; then a TP=2 run with a kernel profile of 20
#   steps (where each rank's device idles between kernels). Each run's tile picks per rank are
#   in its device_only.rank_gemv_tuning.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
gpu_tests tune 120 tests/gpu/test_kernels.py -k "gemv_tune or dependent_launches or small_batch_gemv"
decode_step tp1 1 0
KVMESH_GEMV_ROW_SWEEP=0 decode_step tp2_autotune 2 0,1
decode_step tp2_sweep 2 0,1
KVMESH_GEMV_ROW_SWEEP=0 decode_step tp2_autotune_again 2 0,1
decode_step tp2_sweep_again 2 0,1
decode_step tp1_again 1 0
echo "steps done at ${SECONDS}s"
# each run's one-row GEMV picks: shape -> (config, µs a call in the tuner's graph) per rank
python3 - $OUT <<'PY'
import json, sys, glob, os
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    try:
        d = json.load(open(f))["decode"]["device_only"]
    except (ValueError, KeyError, TypeError):
        continue
    ranks = d.get("rank_gemv_tuning") or [d.get("gemv_tuning")]
    print(os.path.basename(f), "graph", [round(g, 3) for g in d.get("rank_graph_ms", [d.get("graph_ms", 0)])])
    for i, rep in enumerate(ranks):
        print("  rank", i, {s: (e.get("row_config"), e.get("row")) for s, e in (rep or {}).items()})
PY
[ $SECONDS -lt 480 ] && decode_step tp2_sweep_profile 2 0,1 "$MD" 20
echo "done at ${SECONDS}s"
