#!/bin/bash
# One device call on nvidia-h100-x4, two lanes at once:
#   GPUs 0,1  #5: bench/parallel.py tp1,tp2 with a kernel profile of every rank (--profile-steps),
#             then tp2 again with KVMESH_CUSTOM_ALLREDUCE=1; then #4 (4): bench/gpu_http_bench.py on
#             GPU 0 (TTFT / ITL at concurrency 1, 16, 128 through the HTTP server, stream channel on)
#   GPUs 2,3  #6: bench/disagg_serve.py, mode auto (1 prefill + 1 decode) vs 2 colocated; then the
#             engine and disaggregation GPU tests
set -u
source bench/device/env.sh
(
  export CUDA_VISIBLE_DEVICES=0,1
  timeout "${PAR_S:-240}" python3 bench/parallel.py all --parts tp1,tp2 --budget-s "${PAR_BUDGET_S:-230}" \
      --profile-steps 30 --out "$OUT/parallel.json" > $L/parallel.log 2>&1
  KVMESH_CUSTOM_ALLREDUCE=1 timeout 150 python3 bench/parallel.py all --parts tp2 --budget-s 140 \
      --profile-steps 30 --num-requests 64 --out "$OUT/parallel_custom_ar.json" > $L/parallel_custom_ar.log 2>&1
  export CUDA_VISIBLE_DEVICES=0
  timeout "${HTTP_S:-250}" python3 bench/gpu_http_bench.py --out "$OUT/gpu_http.json" > $L/gpu_http.log 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=2,3
  timeout "${SERVE_S:-420}" python3 bench/disagg_serve.py --model-shape llama8b --disagg-mode auto \
      --duration-s "${DURATION_S:-30}" --drain-s 10 --out "$OUT/disagg_serve.json" > $L/disagg_serve.log 2>&1
  timeout "${TEST_S:-180}" python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_engine_gpu.py \
      tests/gpu/test_disagg_gpu.py > $L/gpu_tests.txt 2>&1
) &
wait
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
for name in ("parallel.json", "parallel_custom_ar.json"):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        print(name, "missing"); continue
    d = json.load(open(p))
    t = d.get("throughput", {})
    print(name, d.get("parts"), "ratio", d.get("decode_step_ratio_vs_tp1"), "tok/s tp1x2", t.get("tp1_x2_output_tok_s"), "tp2x1", t.get("tp2_x1_output_tok_s"))
    for tp, r in d.get("decode", {}).items():
        dec = (r.get("decode") or {}) if isinstance(r, dict) else {}
        prof = dec.get("profile") or {}
        print(" TP", tp, "step ms", round(dec.get("median_step_ms", 0), 3), "profiled step ms", round(prof.get("median_step_ms", 0), 3))
        for rank in prof.get("ranks") or []:
            print("  rank", rank["rank"], "kernel us/step", round(rank["kernel_us_per_step"], 1))
            for row in rank["rows"][:12]:
                print("   ", round(row["us_per_step"], 1), round(row["calls_per_step"], 1), row["name"][:70])
PY
grep -A4 "^concurrency" $L/gpu_http.log; tail -3 $L/gpu_http.log
tail -22 $L/disagg_serve.log
grep -E "^(FAILED|ERROR)|passed|failed" $L/gpu_tests.txt | tail -8
tar -czf "$OUT/logs.tgz" -C /tmp logs
