#!/bin/bash
# One device call on nvidia-h200 (one GPU; the multi-GPU kinds were withheld this session):
#   1. the single-GPU tests (kernels incl. the fused RoPE + K/V store, Triton attention, the engine
#      with CUDA graphs, disaggregation with both engines on one GPU over the channel mailbox)
#   2. bench/kv_scatter.py: a hand-off's scatter / gather, stacked cache vs per layer (8B shape)
#   3. bench/kernels.py --rope-store: RoPE + store as two launches vs one (8B decode shapes)
#   4. the 8B-shape decode step at TP=1, batch 1, fused RoPE + store on, then off (A/B, same call)
set -u
source bench/device/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout "${TEST_S:-240}" python3 -m pytest -q -p no:cacheprovider -rA -m "gpu and not multigpu and not multigpu4" \
    tests/gpu/test_kernels.py tests/gpu/test_rope_store.py tests/gpu/test_triton_attention.py \
    tests/gpu/test_engine_gpu.py tests/gpu/test_disagg_gpu.py tests/gpu/test_no_recompile.py > $L/gpu_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|error" $L/gpu_tests.txt | tail -15
timeout 120 python3 bench/kv_scatter.py --shape llama8b --out "$OUT/kv_scatter_h200.json" > $L/kv_scatter.log 2>&1
tail -5 $L/kv_scatter.log
timeout 120 python3 -m bench.kernels --rope-store --out "$OUT/kernels_rope_store_h200.json" > $L/rope_store.log 2>&1
tail -8 $L/rope_store.log
for mode in fused unfused; do
  if [ $mode = unfused ]; then export KVMESH_DISABLE_FUSED_ROPE_STORE=1; fi
  timeout 150 python3 bench/parallel.py engine --tp 1 --decode --profile-steps 30 > $L/tp1_$mode.log 2>&1
  grep "^RESULT " $L/tp1_$mode.log | sed 's/^RESULT //' > "$OUT/tp1_decode_$mode.json"
  python3 - "$OUT/tp1_decode_$mode.json" $mode <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as exc:
    print(sys.argv[2], "no result:", exc); sys.exit()
dec = r.get("decode") or {}
prof = dec.get("profile") or {}
print(sys.argv[2], "TP1 decode step ms", round(dec.get("median_step_ms", 0), 3), "profiled", round(prof.get("median_step_ms", 0), 3))
for rank in prof.get("ranks") or []:
    print("  kernel us/step", round(rank["kernel_us_per_step"], 1), "idle", rank.get("idle_us_per_step"))
    for row in rank["rows"][:12]:
        print("   ", round(row["us_per_step"], 1), round(row["calls_per_step"], 1), row["name"][:70])
PY
done
unset KVMESH_DISABLE_FUSED_ROPE_STORE
tar -czf "$OUT/logs.tgz" -C /tmp logs
