#!/bin/bash
# One device call on nvidia-h200 (stop 19): the decode splits merged by the last split of each
# (request, KV head) instead of a reduce launch (engine/attention/triton_kernels.py, on by default;
# KVMESH_DISABLE_FUSED_DECODE_REDUCE=1 for the old path).
#   1. single-GPU tests: attention (fused vs reduce kernel bit for bit, CUDA graph replay), kernels,
#      no-recompile, the engine (greedy tokens vs HF, CUDA graphs)
#   2. the 8B-shape decode step at TP=1, batch 1, fused and not, alternated, each its own engine
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests attention 240 -m "gpu and not multigpu and not multigpu4" tests/gpu/test_triton_attention.py \
    tests/gpu/test_no_recompile.py tests/gpu/test_kernels.py tests/gpu/test_engine_gpu.py
MD=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-llama8b-shape'))")
decode() {  # TAG: one engine's TP=1 decode step at batch 1 (bench/parallel.py's engine part)
  timeout 150 python3 bench/parallel.py engine --tp 1 --decode --model-dir "$MD" \
      --decode-steps 96 --profile-steps 0 --prompt-len ${PROMPT:-128} --max-tokens 128 --max-num-seqs 64 \
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
for i in 1 2; do
  KVMESH_DISABLE_FUSED_DECODE_REDUCE=1 decode "tp1_reduce_kernel_$i"
  decode "tp1_fused_$i"
done
tail -3 $L/tp1_fused_1.err
