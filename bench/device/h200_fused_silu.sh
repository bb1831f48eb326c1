#!/bin/bash
# One device call (#5, stop 18): the MLP's gate_up GEMV with SiLU-and-mul in its epilogue at batch 1
# (engine/kernels/gemv.py: gemv_row_silu; KVMESH_FUSED_SILU=0 turns it off).
#   1. tests/gpu/test_kernels.py: the fused kernel = the two kernels bit for bit (eager, CUDA graph,
#      PDL on and off); the dependent-launch chains; tests/gpu/test_engine_gpu.py
#   2. 8B-shape decode step at batch 1, fused off / on alternated: TP=1 on GPU 0 and, on 2+ GPUs, TP=2
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
NGPU=$(nvidia-smi -L | wc -l)
gpu_tests test_kernels 150 tests/gpu/test_kernels.py -k "fused_gate_up or dependent or tune"
gpu_tests test_engine 150 tests/gpu/test_engine_gpu.py
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
for fused in 0 1 0 1; do
  export KVMESH_FUSED_SILU=$fused
  decode "tp1_fused$fused" 1 0
  [ "$NGPU" -ge 2 ] && decode "tp2_fused$fused" 2 0,1
done
grep -h "batch-1 linear" $L/tp1_fused1.err | tail -1 | cut -c1-400
