#!/bin/bash
# One device call on nvidia-h200-x4 (#5): the weight prefetch of engine/kernels/prefetch.py.
#   1. GPU tests: rms_norm with and without prefetch (bit-identical), the LL all-reduce at 2 and
#      4 ranks (its self-check prefetches on every other case); llama TP=4 vs one GPU
#   2. bench/parallel.py tp1,tp2 with KVMESH_WEIGHT_PREFETCH_MB=0 (off), then tp1,tp2,tp4 with
#      the default (16 MB) and kernel profiles; then, if time is left, tp1,tp2 at 32 MB
set -u
source bench/device/env.sh
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -4
timeout 90 python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_kernels.py -k "rms_norm" > $L/test_kernels.txt 2>&1
echo "test_kernels (rms_norm): $(grep -E 'passed|failed|error' $L/test_kernels.txt | tail -1)"
grep -E "^(FAILED|ERROR)|^E " $L/test_kernels.txt | head -6
timeout 90 python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_ll_allreduce.py > $L/test_ll.txt 2>&1
echo "test_ll_allreduce: $(grep -E 'passed|failed|error' $L/test_ll.txt | tail -1)"
grep -E "^(FAILED|ERROR)|^E " $L/test_ll.txt | head -6
timeout 110 python3 -m pytest -q -x -p no:cacheprovider -rA --tb=short tests/gpu/test_parallel_gpu.py -k "llama-tp4" > $L/test_tp4.txt 2>&1
echo "llama-tp4: $(grep -E 'passed|failed|error' $L/test_tp4.txt | tail -1)"
grep -E "^E " $L/test_tp4.txt | head -8
bench() {  # name, MB, parts, extra args
  KVMESH_WEIGHT_PREFETCH_MB=$2 timeout 200 python3 bench/parallel.py all --parts "$3" --budget-s 190 ${4:-} \
      --out "$OUT/parallel_$1.json" > $L/parallel_$1.log 2>&1
  echo "== $1 (prefetch $2 MB)"
  python3 bench/device/parallel_summary.py "$OUT/parallel_$1.json" --ranks 1 --rows 7
  cp -r "$OUT/parallel_$1.json.logs" $L/ 2>/dev/null; rm -rf "$OUT/parallel_$1.json.logs"
}
bench off 0 tp1,tp2 "--num-requests 64"
bench on 16 tp1,tp2,tp4 "--profile-steps 30"
if [ $SECONDS -lt 420 ]; then bench mb32 32 tp1,tp2 "--num-requests 64"; fi
tar -czf "$OUT/logs.tgz" -C /tmp logs
