#!/bin/bash
# One device call on nvidia-h200 (#5, stop 19; only single-GPU machines were lent): one-row GEMVs
# that load more than one weight tile before they wait (KVMESH_GEMV_PRELOAD, engine/kernels/gemv.py).
#   1. tests/gpu/test_kernels.py's GEMV tests with a 32 KiB preload (cuBLAS agreement, bit-identical
#      dependent launches, eager and in a CUDA graph)
#   2. bench/gemv_preload.py: one decoder layer's GEMV chain with stand-in kernels between the
#      GEMVs (TP=1 norms; TP=2's all-reduce as a spin, its dependents let go early or late)
#   3. the 8B-shape decode step at TP=1, batch 1, per KVMESH_GEMV_PRELOAD setting, in turn
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
KVMESH_GEMV_PRELOAD=32768 gpu_tests test_kernels 200 tests/gpu/test_kernels.py -k "gemv or dependent"
timeout 240 python3 bench/gemv_preload.py --out "$OUT/gemv_preload_h200.json" > $L/gemv_preload.log 2>&1
grep -v "^ " $L/gemv_preload.log | tail -12
MD=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-llama8b-shape'))")
decode() {  # TAG: one engine's TP=1 decode step at batch 1 (bench/parallel.py's engine part)
  timeout 150 python3 bench/parallel.py engine --tp 1 --decode --model-dir "$MD" \
      --decode-steps 96 --profile-steps 0 --prompt-len 128 --max-tokens 128 --max-num-seqs 64 \
      > "$L/$1.out" 2> "$L/$1.err"
  python3 - "$1" "$L/$1.out" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[2]) if l.startswith("RESULT ")]
if not lines:
    print(sys.argv[1], "no result"); sys.exit()
r = json.loads(lines[-1][7:]); d = r.get("decode", {})
print(sys.argv[1], "median %.3f mean %.3f p90 %.3f ms" % (d["median_step_ms"], d["mean_step_ms"], d["p90_step_ms"]),
      "init %.0f s" % r["init_s"])
PY
}
for b in ${SETTINGS:-0 32768 65536 0 32768}; do
  KVMESH_GEMV_PRELOAD=$b decode "tp1_pre$b"
done
tail -3 $L/tp1_pre0.err
