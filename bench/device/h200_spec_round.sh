#!/bin/bash
# One device call on nvidia-h200 (#5, stop 21): the LL kernel's guessed round (KVMESH_LL_SPEC_ROUND,
# LL_SPEC_ROUND in engine/distributed/ll_kernel.py) in the loopback harness: the tests (pushed
# calls with the guess, without it, and with an always-wrong guess), then 2000 pushed calls of one
# 4096 row per rank with the guess (default) and without (-DLL_SPEC_ROUND=0), 2 and 4 ranks.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests ll_loopback 300 tests/gpu/test_ll_loopback.py
grep -E "passed|failed" $L/ll_loopback.txt | tail -3
for r in 2 4; do
  for opt in "" "-DLL_SPEC_ROUND=0"; do
    tag=r${r}_pushed${opt:+_spec0}
    timeout 100 python3 bench/ll_loopback.py --ranks $r --pushed ${opt:+--option=$opt} --out $OUT/ll_loopback_$tag.json > $L/ll_loopback_$tag.log 2>&1
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
