#!/bin/bash
# One device call on nvidia-h100-x4, two lanes at once:
#   GPUs 0,1  #4: kernel tests, single stream / TTFT (bench/gpu_bench.py copy,engine, no mixed set);
#             #5: TP=2 decode step with the custom all-reduce (bench/parallel.py --parts tp2);
#             batch-1 GEMV probe (bench/gemv_probe.py)
#   GPUs 2,3  #6: bench/disagg_serve.py, mode disaggregated vs colocated
set -u
source bench/device/env.sh
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py -k "argmax or gemv" > $L/kernel_tests.txt 2>&1
  timeout 150 python3 bench/gpu_bench.py --parts copy,engine --num-mixed 0 --max-num-seqs 512 \
      --out "$OUT/gpu_bench_engine.json" > $L/gpu_bench.log 2>&1
  export CUDA_VISIBLE_DEVICES=0,1 KVMESH_CUSTOM_ALLREDUCE=1
  timeout 200 python3 bench/parallel.py all --parts tp2 --budget-s 190 --out "$OUT/parallel_custom_ar.json" \
      > $L/parallel.log 2>&1
  export CUDA_VISIBLE_DEVICES=0
  timeout 80 python3 bench/gemv_probe.py --out "$OUT/gemv_probe.json" > $L/gemv.log 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=2,3
  timeout 330 python3 bench/disagg_serve.py --model-shape llama8b --disagg-mode disaggregated \
      --duration-s 40 --drain-s 10 --out "$OUT/disagg_serve.json" > $L/disagg_serve.log 2>&1
) &
wait
tail -2 $L/kernel_tests.txt
grep "\[gpu_bench\]" $L/gpu_bench.log | grep -v saved
cat $L/gemv.log | tail -5
python3 - <<'PY'
import json, os
p = os.path.join(os.environ["OUT"], "parallel_custom_ar.json")
if os.path.exists(p):
    d = json.load(open(p))
    print("parallel", d.get("parts"), {k: (v.get("decode") if isinstance(v, dict) else v) for k, v in d.get("decode", {}).items()},
          d.get("throughput", {}).get("tp2_x1_output_tok_s"))
PY
tail -22 $L/disagg_serve.log
tar -czf "$OUT/logs.tgz" -C /tmp logs
