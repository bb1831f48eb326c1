#!/bin/bash
# One device call on nvidia-h200 (#5, stop 21): the shared-memory streaming GEMV
# (engine/kernels/stream_gemv.py) vs the Triton one-row GEMV, alone and in one layer's chain
# with stand-in gaps (bench/stream_gemv.py); then the LL loopback A/B of relaxed stores.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
timeout 300 python3 bench/stream_gemv.py --out $OUT/stream_gemv_h200.json 2>&1 | tail -40
if [ "${LOOPBACK:-1}" = 1 ]; then
  for r in 2 4; do
    for relaxed in 0 1; do
      tag=r${r}_relaxed$relaxed
      KVMESH_LL_RELAXED_STORES=$relaxed timeout 100 python3 bench/ll_loopback.py --ranks $r --out $OUT/ll_loopback_$tag.json > $L/ll_loopback_$tag.log 2>&1
      python3 - "$tag" $OUT/ll_loopback_$tag.json <<'PY'
import json, sys
try:
    r = [x for x in json.load(open(sys.argv[2]))["reports"] if x["issued"] == "last"][0]["stamps"]
    print(sys.argv[1], "after wait %.2f us (peers %.2f, finish %.2f)" % (
        r["after_wait_us"]["median"], r["peers_us"]["median"], r["finish_us"]["median"]))
except Exception as exc:
    print(sys.argv[1], "no result", exc)
PY
    done
  done
fi
