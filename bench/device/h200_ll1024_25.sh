#!/bin/bash
# One device call on one H200 (#5, stop 25): the LL kernel's own cost per call, built as 1024
# threads of one line each against the default 512 x 2 (stop 20 measured 512x8, 512x2, 256x4 and
# 128x8, not 1024x1), in the loopback harness (bench/ll_loopback.py, 2 ranks, one 4096 row, the
# rank issued last: its peers' lines already in), twice each, interleaved.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
for round in 1 2; do
  for builds in 512x2 1024x1; do
    tag=r2_builds${builds}_$round
    KVMESH_LL_BUILDS=$builds timeout 100 python3 bench/ll_loopback.py --ranks 2 --out $OUT/ll_loopback_$tag.json \
      > $L/ll_loopback_$tag.log 2>&1
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
echo "done at ${SECONDS}s"
