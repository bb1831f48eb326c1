#!/bin/bash
# One device call on nvidia-h200 (#5, stop 20): the LL all-reduce with every rank in one process on
# one GPU (bench/ll_loopback.py), as only one-GPU machines were lent.
#   1. tests/gpu/test_ll_loopback.py: same bits on every rank and the reference (2 and 4 ranks),
#      the pushing GEMV, the stamps (KVMESH_LL_STAMPS)
#   2. bench/ll_loopback.py: 2000 fused calls of one 4096 row per rank, issued rank after rank:
#      the stamps of the rank issued last (its peers' lines already in) are the kernel's own
#      cost; per KVMESH_LL_BUILDS for the 4096 row (512x2, the default; 512x8, the build before
#      stop 20) and KVMESH_LL_RELAXED_STORES (0: st.volatile pushes, the default; 1: relaxed);
#      2 and 4 ranks. (Stop 20 measured 512x8, 512x2, 256x4 and 128x8 with this script at afbf3d7:
#      README, #5 section.) (Also measured this stop and dropped: both-parity loads before the round
#      is known, every peer's first load issued at once, ld.relaxed.sys for ld.volatile.)
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests ll_loopback 280 tests/gpu/test_ll_loopback.py
grep -E "^(FAILED|E )" $L/ll_loopback.txt | head -20
for r in 2 4; do
  # SETTINGS: builds:relaxed-stores (KVMESH_LL_BUILDS, KVMESH_LL_RELAXED_STORES)
  for setting in ${SETTINGS:-512x2:0 512x2:1 512x8:0 512x8:1}; do
    builds=${setting%%:*}; relaxed=${setting##*:}
    tag=r${r}_builds${builds}_relaxed$relaxed
    KVMESH_LL_BUILDS=$builds KVMESH_LL_RELAXED_STORES=$relaxed timeout 100 python3 bench/ll_loopback.py --ranks $r --out $OUT/ll_loopback_$tag.json \
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
