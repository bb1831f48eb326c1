#!/bin/bash
# One device call on nvidia-h100-x4, two lanes at once:
#   GPUs 0,1  #4: GPU kernel tests + bench/gpu_bench.py single stream / TTFT / decode profile on
#             GPU 0 (copy,engine with --num-mixed 0); then #5: bench/parallel.py tp1,tp2
#             (decode step TP=1 vs TP=2 over the shm step channel, TP=1x2 vs TP=2x1 throughput)
#   GPUs 2,3  #6: bench/disagg_serve.py, mode disaggregated (1 prefill + 1 decode) vs 2 colocated
set -u
source bench/device/env.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv > $L/nvidia_smi.txt 2>&1
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py > $L/kernel_tests.txt 2>&1
  timeout "${ENGINE_S:-170}" python3 bench/gpu_bench.py --parts copy,engine --num-mixed 0 --max-num-seqs 512 \
      --decode-profile --profile-dir $L --out "$OUT/gpu_bench_engine.json" > $L/gpu_bench.log 2>&1
  export CUDA_VISIBLE_DEVICES=0,1
  timeout "${PAR_S:-330}" python3 bench/parallel.py all --parts tp1,tp2 --budget-s "${PAR_BUDGET_S:-320}" \
      --out "$OUT/parallel.json" > $L/parallel.log 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=2,3
  timeout "${SERVE_S:-500}" python3 bench/disagg_serve.py --model-shape llama8b --disagg-mode disaggregated \
      --duration-s "${DURATION_S:-40}" --drain-s 10 ${SERVE_ARGS:-} --out "$OUT/disagg_serve.json" \
      > $L/disagg_serve.log 2>&1
) &
wait
tail -3 $L/kernel_tests.txt
grep "\[gpu_bench\]" $L/gpu_bench.log | tail -8
grep -iE "batch-1 linear" $L/gpu_bench.log | tail -2
python3 - <<'PY'
import json, os
for name in ("parallel.json", "disagg_serve.json"):
    p = os.path.join(os.environ["OUT"], name)
    if not os.path.exists(p):
        print(name, "missing"); continue
    d = json.load(open(p))
    if name == "parallel.json":
        print("parallel parts", d.get("parts"))
        for tp, r in d.get("decode", {}).items():
            print("TP", tp, {k: v for k, v in (r.get("decode") or {}).items() if "ms" in k} if isinstance(r, dict) else r)
        print("throughput", d.get("throughput", {}).get("tp1_x2_output_tok_s"), d.get("throughput", {}).get("tp2_x1_output_tok_s"), d.get("summary"))
    else:
        print("disagg ratios", json.dumps(d.get("ratios")))
        for mode, r in d.get("results", {}).items():
            s = (r.get("summary") or {}).get("short") or {}
            print(mode, r.get("error"), {k: s.get(k, {}).get("p50") if isinstance(s.get(k), dict) else s.get(k) for k in ("ttft_s", "itl_s", "output_tok_s")},
                  "p99 itl", (s.get("itl_s") or {}).get("p99"), "p99 ttft", (s.get("ttft_s") or {}).get("p99"))
PY
tail -4 $L/disagg_serve.log $L/parallel.log
tar -czf "$OUT/logs.tgz" -C /tmp logs
