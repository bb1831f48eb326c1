#!/bin/bash
# One device call on nvidia-h200-x2 (#5, stop 18): L2 prefetch of the next weight from the
# latency-bound kernels between GEMVs (engine/kernels/l2_prefetch.py).
#   1. tests/gpu/test_kernels.py: prefetching changes no result (eager, CUDA graph); the PDL chains
#   2. tests/gpu/test_ll_allreduce.py (2 ranks): the LL all-reduce + norm with a prefetch
#   3. 8B-shape decode step at batch 1, TP=1 (GPU 0) and TP=2, for KVMESH_L2_PREFETCH settings
# On one GPU (nvidia-h200: the only kind lent at times) steps 2 and TP=2 are skipped.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
gpu_tests test_kernels 120 tests/gpu/test_kernels.py -k "prefetch or dependent"
NGPU=$(nvidia-smi -L | wc -l)
[ "$NGPU" -ge 2 ] && gpu_tests test_ll 120 tests/gpu/test_ll_allreduce.py -k "two_ranks"
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
settings=(0 "norm=16" "norm=16,attn=16,mlp=8" "norm=24,attn=32,mlp=16")
[ "$NGPU" -lt 2 ] && settings+=("attn=32" "mlp=16" "norm=8" 0)  # TP=1 only: each site alone, and 0 again
for pf in "${settings[@]}"; do
  echo "== KVMESH_L2_PREFETCH=$pf"
  export KVMESH_L2_PREFETCH=$pf
  tag=$(echo "$pf" | tr ',=' '_-')
  decode "tp1_$tag" 1 0
  [ "$NGPU" -ge 2 ] && decode "tp2_$tag" 2 0,1
done
