#!/bin/bash
# One device call on nvidia-h200 (#5, stop 20): where a TP=1 step goes at max load. The 8B shape
# (dummy weights), 64 then 128 requests of 128 -> 128 tokens queued at once (bench/parallel.py
# engine --throughput-requests), each its own engine: output tok/s, the wall time of the
# full-batch decode steps, and a kernel profile of 10 such steps (warm-up run) to set the
# device's time against it. Stop 17 measured TP=1 x 2 replicas (64 each) at 18,595 tok/s and one
# TP=2 replica (128) at 9,586 on 2 H200s; this asks whether one GPU's step at 128 is bound by
# the device or by the host.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
MD=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-llama8b-shape'))")
for n in ${REQUESTS:-64 128}; do
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 bench/parallel.py engine --tp 1 --model-dir "$MD" \
    --throughput-requests $n --prompt-len 128 --max-tokens 128 --max-num-seqs 256 \
    --throughput-profile-steps 10 > $L/tp1_n$n.out 2> $L/tp1_n$n.err
  grep "^RESULT " $L/tp1_n$n.out | tail -1 | cut -c8- > $OUT/maxload_tp1_n$n.json
  python3 - $OUT/maxload_tp1_n$n.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["throughput"]
f = r.get("full_batch_decode", {})
print(f"{r['num_requests']} requests: {r['output_tok_s']:.0f} tok/s in {r['seconds']:.3f} s; full-batch decode "
      f"{f.get('steps')} steps, median {f.get('median_step_ms', 0):.3f} ms, p90 {f.get('p90_step_ms', 0):.3f}, "
      f"sum {f.get('sum_s', 0):.3f} s")
for rank in r.get("full_batch_decode_profile", {}).get("ranks", []):
    print(f"  device kernels {rank['kernel_us_per_step']:.0f} us/step; idle {rank.get('idle_us_per_step')}")
    for row in rank["rows"][:8]:
        print(f"    {row['name'][:60]}: {row['us_per_step']:.0f} us x{row['calls_per_step']:.0f}")
    for row in rank.get("host_api", [])[:5]:
        print(f"    host {row['name']}: {row['us_per_step']:.0f} us x{row['calls_per_step']:.1f}")
PY
  echo "  at ${SECONDS}s"
done
tail -3 $L/tp1_n64.err
