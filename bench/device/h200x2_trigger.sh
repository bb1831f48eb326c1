#!/bin/bash
# One device call on nvidia-h200-x2 (#5; written in stop 19, when only one-GPU machines were lent):
# the TP=2 A/B that bench/gemv_preload.py's one-GPU stand-in asks for.
#   1. the LL all-reduce and GEMV tests with both knobs on (KVMESH_LL_TRIGGER=wait: the kernel after
#      an LL call launches after the call's own wait; KVMESH_GEMV_PRELOAD=32768: a one-row GEMV
#      program loads 32 KiB of its rows before its wait)
#   2. the 8B-shape decode step at batch 1: TP=1 on GPU 0, then TP=2 per setting, in turn, and once
#      with KVMESH_LL_BUILDS=512x8 (stop 20: the LL kernel's build of before; bench/ll_loopback.py on one
#      GPU measured the default 512x2 build's call at 2.59 against 3.42 us after its wait)
#   3. (stop 20) where an LL call's time goes: TP=2 decode with KVMESH_LL_STAMPS=1 (each call stamps
#      its start, the end of its wait for the GEMV before, all peers' lines in, its end), read
#      after 20 profiled steps: engine/profiling.py's ll_stamp_summary per rank
#   3b. (stop 21) the pushing GEMV's early round read: TP=2 with KVMESH_PUSH_EARLY_ROUND=0 (the read after
#      the sum, as before) next to the default runs of step 2 (bench/push_gemv.py, one H200: the
#      layer chain's push cost 6.4 -> 2.1 µs a layer)
#   4. (stop 20) max load, 128 requests: one TP=2 replica's full-batch decode steps and kernel
#      profile (stop 17: 9,586 tok/s, slower than one TP=1 replica on ONE H200 at 128 requests in
#      stop 20, 13,976), next to TP=1 at 64 requests on GPU 0. Stop 22 found this host-bound on
#      one GPU (a TP=2 rank's shapes: 3.6 ms of kernels in 6.5-7.1 ms steps, 4.9 ms after its
#      host fixes): this run is the first at TP=2 after them
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -2
KVMESH_LL_TRIGGER=wait KVMESH_GEMV_PRELOAD=32768 gpu_tests ll_and_gemv 160 \
    tests/gpu/test_ll_allreduce.py tests/gpu/test_kernels.py -k "ll or push or gemv or dependent"
decode_step tp1 1 0
for setting in ${SETTINGS:-start:0 wait:0}; do  # stop 21: once each (the push A/B below repeats the default)
  KVMESH_LL_TRIGGER=${setting%%:*} KVMESH_GEMV_PRELOAD=${setting##*:} decode_step "tp2_${setting/:/_}" 2 0,1
done
# stop 20: the LL kernel's single build of before (8 lines a thread) against today's LPT-2 build
KVMESH_LL_BUILDS=512x8 decode_step tp2_builds512x8 2 0,1
KVMESH_PUSH_EARLY_ROUND=0 decode_step tp2_push_late 2 0,1
decode_step tp2_default_again 2 0,1
echo "decode steps done at ${SECONDS}s"
KVMESH_LL_STAMPS=1 CUDA_VISIBLE_DEVICES=0,1 timeout 150 python3 bench/parallel.py engine --tp 2 --decode \
    --model-dir "$MD" --decode-steps 96 --profile-steps 20 --prompt-len 128 --max-tokens 128 \
    --max-num-seqs 64 > $L/tp2_stamps.out 2> $L/tp2_stamps.err
grep "^RESULT " $L/tp2_stamps.out | tail -1 | cut -c8- > $OUT/tp2_ll_stamps.json
python3 - $OUT/tp2_ll_stamps.json <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))["decode"]
except (ValueError, KeyError):
    print("tp2 stamps: no result"); sys.exit()
print("tp2 with LL stamps: median %.3f ms" % d["median_step_ms"])
for rank in d.get("profile", {}).get("ranks", []):
    print("  rank", rank["rank"], json.dumps(rank.get("ll_stamps")))
PY
if [ $SECONDS -lt 420 ]; then
  maxload maxload_tp2_n128 2 0,1 128
  [ $SECONDS -lt 510 ] && maxload maxload_tp1_n64 1 0 64
fi
tail -3 $L/tp2_start_0.err
