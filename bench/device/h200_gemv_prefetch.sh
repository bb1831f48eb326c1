#!/bin/bash
# One device call (#5, stop 18): the one-row GEMVs, launched as dependents, ask L2 for the rest
# of their rows before they wait (KVMESH_GEMV_PREFETCH_MB; engine/kernels/gemv.py).
#   1. tests/gpu/test_kernels.py: bit-identical with and without the prefetch (eager, CUDA graph)
#   2. 8B-shape decode step at batch 1: TP=1 on GPU 0 and, on 2+ GPUs, TP=2, per setting
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
NGPU=$(nvidia-smi -L | wc -l)
gpu_tests test_kernels 150 tests/gpu/test_kernels.py -k "dependent"
MD=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-llama8b-shape'))")
# decode TAG TP GPUS: one engine's decode step at batch 1 (bench/parallel.py's engine part)
decode() {
  CUDA_VISIBLE_DEVICES=$3 timeout 150 python3 bench/parallel.py engine --tp $2 --decode --model-dir "$MD" \
      --decode-steps 96 --profile-steps "${PROFILE:-0}" --prompt-len 128 --max-tokens 128 --max-num-seqs 64 \
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
settings=(${SETTINGS:-0 8 16 32 0})
for mb in "${settings[@]}"; do
  echo "== KVMESH_GEMV_PREFETCH_MB=$mb"
  export KVMESH_GEMV_PREFETCH_MB=$mb
  decode "tp1_pf$mb" 1 0
  [ "$NGPU" -ge 2 ] && decode "tp2_pf$mb" 2 0,1
done
tail -3 $L/tp1_pf16.err
