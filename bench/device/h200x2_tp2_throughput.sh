#!/bin/bash
# One device call on nvidia-h200-x2 (#5, stop 17): is TP=2 throughput at 128 requests lower with
# every kernel a dependent launch? Same call: KVMESH_PDL=gemv (stop 16's setting), 1, gemv again.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
for run in gemv 1 gemv2; do
  pdl=${run%2}
  KVMESH_PDL=$pdl timeout 110 python3 bench/parallel.py all --parts tp2 --budget-s 100 \
      --num-requests 128 --out "$OUT/tp2_$run.json" > $L/tp2_$run.log 2>&1
  python3 - "$OUT/tp2_$run.json" "$run" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
r = d["decode"].get("2", {})
print(sys.argv[2], "step ms", round((r.get("decode") or {}).get("median_step_ms", 0), 3),
      "tok/s", round((r.get("throughput") or {}).get("output_tok_s", 0)), r.get("error", ""))
PY
done
rm -rf "$OUT"/*.logs
