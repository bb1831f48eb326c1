#!/bin/bash
# One device call on nvidia-h200 (stop 19, last): main after moving the GEMV tuner to
# engine/kernels/gemv_tune.py: the single-GPU kernel and engine tests, and the TP=1 8B decode step.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests single_gpu 300 -m "gpu and not multigpu and not multigpu4" tests/gpu/test_kernels.py \
    tests/gpu/test_engine_gpu.py tests/gpu/test_no_recompile.py
MD=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-llama8b-shape'))")
timeout 150 python3 bench/parallel.py engine --tp 1 --decode --model-dir "$MD" --decode-steps 96 --profile-steps 0 \
    --prompt-len 128 --max-tokens 128 --max-num-seqs 64 > $L/tp1.out 2> $L/tp1.err
python3 - $L/tp1.out <<'PY'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("RESULT ")]
r = json.loads(lines[-1][7:]) if lines else {}
d = r.get("decode", {})
print("tp1", "median %.3f mean %.3f p90 %.3f ms" % (d["median_step_ms"], d["mean_step_ms"], d["p90_step_ms"]) if d else "no result",
      "gemv choices", {k: v.get("use") for k, v in (r.get("gemv_tune_us") or {}).items()})
PY
grep -i "batch-1 linear" $L/tp1.err | tail -1 | cut -c1-600
