#!/bin/bash
# One device call on nvidia-h200-x2 (#5 and #6):
#   1. the GEMV kernels' GPU tests (the one-row kernel among them), one pytest process
#   2. bench/gemv_probe.py: batch-1 linear layers of the 8B shape at TP 1/2/4, cuBLAS vs the
#      Triton kernels, as the tuner times them
#   3. bench/parallel.py tp1,tp2: decode step at batch 1 with per-rank kernel profiles, and
#      throughput of TP1 x 2 vs TP2 x 1
#   4. bench/disagg_serve.py, both modes side by side, with ${OVERLAP:+--overlap-prefill},
#      ${INGRESS:-4} ingress replicas and ${CLIENTS:-8} client processes; CPU per Serve role;
#      DIRECT=1: the load on the ingress replicas' own port (--direct-http, no Serve proxy)
#   5. REPEAT=1: both modes again with --seed 1
#   6. GC_AB=1: disaggregated mode again with Python's own GC thresholds (KVMESH_GC_THRESHOLDS=0)
# PARTS (default "tests,probe,parallel,serve") picks steps.
set -u
source bench/device/env.sh
PARTS=${PARTS:-tests,probe,parallel,serve}
has() { [[ ",$PARTS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name --format=csv,noheader | head -2
if has tests; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_kernels.py -k "gemv" > $L/test_kernels.txt 2>&1
  echo "test_kernels (gemv): $(grep -E 'passed|failed|error' $L/test_kernels.txt | tail -1)"
  grep -E "^(FAILED|ERROR)" $L/test_kernels.txt | head -5
fi
if has probe; then
  timeout 120 python3 bench/gemv_probe.py --out "$OUT/gemv_probe.json" > $L/gemv_probe.log 2>&1
  grep -E "^tp|Error" $L/gemv_probe.log | head -20
fi
if has parallel; then
  timeout "${PAR_S:-170}" python3 bench/parallel.py all --parts tp1,tp2 --budget-s "${PAR_BUDGET_S:-160}" \
      --profile-steps 30 --out "$OUT/parallel.json" > $L/parallel.log 2>&1
  python3 bench/device/parallel_summary.py "$OUT/parallel.json" --ranks 1 --rows 9
fi
if has serve; then
  timeout "${SERVE_S:-330}" python3 bench/disagg_serve.py --model-shape llama8b --disagg-mode disaggregated \
      --duration-s "${DURATION_S:-30}" --drain-s 10 ${OVERLAP:+--overlap-prefill} \
      --ingress-replicas "${INGRESS:-4}" --client-processes "${CLIENTS:-8}" ${DIRECT:+--direct-http} \
      --out "$OUT/disagg_serve.json" > $L/disagg_serve.log 2>&1
  grep -E "ok in|CPU busy|steps; gap ms|stall clusters|failed|Error" $L/disagg_serve.log | head -30
  tail -16 $L/disagg_serve.log
  gzip -9 "$OUT/disagg_serve.json"
fi
if [ -n "${REPEAT:-}" ]; then  # both modes again, another seed's workload
  timeout "${SERVE_S:-330}" python3 bench/disagg_serve.py --model-shape llama8b --disagg-mode disaggregated \
      --duration-s "${DURATION_S:-30}" --drain-s 10 ${OVERLAP:+--overlap-prefill} --seed 1 \
      --ingress-replicas "${INGRESS:-4}" --client-processes "${CLIENTS:-8}" ${DIRECT:+--direct-http} \
      --out "$OUT/disagg_serve_seed1.json" > $L/disagg_serve_seed1.log 2>&1
  grep -E "ok in|CPU busy|steps; gap ms|stall clusters|failed|Error" $L/disagg_serve_seed1.log | head -30
  tail -16 $L/disagg_serve_seed1.log
  gzip -9 "$OUT/disagg_serve_seed1.json"
fi
if [ -n "${GC_AB:-}" ]; then
  KVMESH_GC_THRESHOLDS=0 timeout "${GC_S:-170}" python3 bench/disagg_serve.py --model-shape llama8b \
      --disagg-mode disaggregated --modes disaggregated --duration-s "${DURATION_S:-30}" --drain-s 10 \
      ${OVERLAP:+--overlap-prefill} --ingress-replicas "${INGRESS:-4}" --client-processes "${CLIENTS:-8}" \
      ${DIRECT:+--direct-http} --out "$OUT/disagg_serve_gc0.json" > $L/disagg_serve_gc0.log 2>&1
  grep -E "ok in|CPU busy|steps; gap ms|stall clusters|failed|Error" $L/disagg_serve_gc0.log | head -12
  gzip -9 "$OUT/disagg_serve_gc0.json"
fi
tar -czf "$OUT/logs.tgz" -C /tmp logs
