# Sourced first by every bench/device/*.sh: the Python packages the device machine lacks (Ray,
# FastAPI, openai, ...) from the carried bundle (.gpubundle, ../shared/tools/gpu-bundle), the
# repo on the path, a private Ray's settings, and $L for the logs that come back in logs.tgz.
mkdir -p /tmp/site && tar -xJf .gpubundle/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export PYTHONUNBUFFERED=1
L=/tmp/logs; mkdir -p $L
# gpu_tests NAME TIMEOUT_S PYTEST_ARGS...: pytest into $L/NAME.txt; prints its summary line and failures
gpu_tests() {
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider -rA "$@" > "$L/$name.txt" 2>&1
  echo "$name: $(grep -E 'passed|failed|error' "$L/$name.txt" | tail -1)"
  grep -E "^(FAILED|ERROR)|^E " "$L/$name.txt" | head -8
}
# decode_step TAG TP GPUS [MODEL_DIR [PROFILE_STEPS]]: one engine's 8B-shape decode step at batch 1
# (bench/parallel.py's engine part, dummy weights in $MD, made on first use, or MODEL_DIR) on
# CUDA_VISIBLE_DEVICES=GPUS, logs in $L/TAG.{out,err}, RESULT also in $OUT/TAG.json; prints the
# median, mean and p90 step of its RESULT line, and the device-only step (graph replays) where measured
decode_step() {
  [ -n "${MD:-}" ] || MD=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-llama8b-shape'))")
  CUDA_VISIBLE_DEVICES=$3 timeout 150 python3 bench/parallel.py engine --tp $2 --decode --model-dir "${4:-$MD}" \
      --decode-steps 96 --profile-steps "${5:-0}" --prompt-len 128 --max-tokens 128 --max-num-seqs 64 \
      ${BENCH_ARGS:-} > "$L/$1.out" 2> "$L/$1.err"
  grep "^RESULT " "$L/$1.out" | tail -1 | cut -c8- > "$OUT/$1.json"
  python3 - "$1" "$L/$1.out" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[2]) if l.startswith("RESULT ")]
if not lines:
    print(sys.argv[1], "no result"); sys.exit()
r = json.loads(lines[-1][7:]); d = r.get("decode", {})
print(sys.argv[1], "median %.3f mean %.3f p90 %.3f ms" % (d["median_step_ms"], d["mean_step_ms"], d["p90_step_ms"]),
      "init %.0f s" % r["init_s"])
o = d.get("device_only")
if o:
    print("  device only: graph %.3f ms, graph + LM head %.3f ms; host gap %.3f ms" % (o["graph_ms"], o["step_ms"], o["host_gap_ms"]))
PY
}
# maxload TAG TP GPUS N [MODEL_DIR]: one engine's output tok/s for N requests of 128 -> 128 tokens
# queued at once (bench/parallel.py engine --throughput-requests, 8B shape, $MD or MODEL_DIR), the
# wall time of its full-batch decode steps and a kernel profile of 10 of them (every rank); JSON
# in $OUT/TAG.json. Both functions append $BENCH_ARGS (e.g. "--executor ray") to the command.
maxload() {
  [ -n "${MD:-}" ] || MD=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-llama8b-shape'))")
  CUDA_VISIBLE_DEVICES=$3 timeout 240 python3 bench/parallel.py engine --tp $2 --model-dir "${5:-$MD}" \
    --throughput-requests $4 --prompt-len 128 --max-tokens 128 --max-num-seqs 256 \
    --throughput-profile-steps 10 ${BENCH_ARGS:-} > "$L/$1.out" 2> "$L/$1.err"
  grep "^RESULT " "$L/$1.out" | tail -1 | cut -c8- > "$OUT/$1.json"
  python3 - "$1" "$OUT/$1.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[2]))["throughput"]
except (ValueError, KeyError):
    print(sys.argv[1], "no result"); sys.exit()
f = r.get("full_batch_decode", {})
print(f"{sys.argv[1]}: {r['num_requests']} requests, {r['output_tok_s']:.0f} tok/s in {r['seconds']:.3f} s; "
      f"full-batch decode {f.get('steps')} steps, median {f.get('median_step_ms', 0):.3f} ms, "
      f"p90 {f.get('p90_step_ms', 0):.3f}, sum {f.get('sum_s', 0):.3f} s")
for rank in r.get("full_batch_decode_profile", {}).get("ranks", []):
    print(f"  rank {rank['rank']}: device kernels {rank['kernel_us_per_step']:.0f} us/step; idle {rank.get('idle_us_per_step')}")
    for row in rank["rows"][:8]:
        print(f"    {row['name'][:60]}: {row['us_per_step']:.0f} us x{row['calls_per_step']:.0f}")
    for row in rank.get("host_api", [])[:5]:
        print(f"    host {row['name']}: {row['us_per_step']:.0f} us x{row['calls_per_step']:.1f}")
PY
}
