#!/bin/bash
# One device call on nvidia-h200-x4 (#5 on 4 GPUs):
#   1. GPU tests, one pytest process per file: the LL and one-shot all-reduces at 2 and 4 ranks,
#      TP/PP/EP equality on 2 and 4 GPUs (tiny configs, bf16) and the 8B shape at TP=2 and TP=4,
#      the GEMV kernels (one-row cases among them)
#   2. bench/parallel.py: all-reduce bus bandwidth on 2 and 4 ranks, decode step at batch 1 at
#      TP=1/2/4 with per-rank kernel profiles, TP=1 x 2 vs TP=2 x 1 throughput
# PARTS (default "tests,parallel") picks steps; BENCH_PARTS the bench's parts.
set -u
source bench/device/env.sh
PARTS=${PARTS:-tests,parallel}
has() { [[ ",$PARTS," == *",$1,"* ]]; }
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv; nvidia-smi topo -m; } > "$OUT/nvidia_smi.txt" 2>&1
head -5 "$OUT/nvidia_smi.txt"
if has tests; then
  for f in test_ll_allreduce test_custom_allreduce test_parallel_gpu test_kernels; do
    k=""; [ $f = test_kernels ] && k="-k gemv"
    timeout "${TEST_S:-300}" python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/$f.py $k > $L/$f.txt 2>&1
    echo "$f: $(grep -E 'passed|failed|error' $L/$f.txt | tail -1)"
    grep -E "^(FAILED|ERROR|SKIPPED)" $L/$f.txt | head -8
  done
fi
if has parallel; then
  timeout "${PAR_S:-330}" python3 bench/parallel.py all --parts "${BENCH_PARTS:-allreduce2,allreduce4,tp1,tp2,tp4}" \
      --budget-s "${PAR_BUDGET_S:-320}" --profile-steps 30 --out "$OUT/parallel.json" > $L/parallel.log 2>&1
  python3 bench/device/parallel_summary.py "$OUT/parallel.json" --ranks 1 --rows 9
  tail -5 $L/parallel.log
  cp -r "$OUT/parallel.logs" $L/ 2>/dev/null; rm -rf "$OUT/parallel.logs"  # bench/parallel.py's <out>.logs
fi
tar -czf "$OUT/logs.tgz" -C /tmp logs
