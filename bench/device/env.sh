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
# decode_step TAG TP GPUS: one engine's 8B-shape decode step at batch 1 (bench/parallel.py's engine
# part, dummy weights in $MD, made on first use) on CUDA_VISIBLE_DEVICES=GPUS, logs in $L/TAG.{out,err};
# prints the median, mean and p90 step of its RESULT line
decode_step() {
  [ -n "${MD:-}" ] || MD=$(python3 -c "from bench.parallel_parts import write_model_dir; print(write_model_dir('/tmp/kvmesh-llama8b-shape'))")
  CUDA_VISIBLE_DEVICES=$3 timeout 150 python3 bench/parallel.py engine --tp $2 --decode --model-dir "$MD" \
      --decode-steps 96 --profile-steps 0 --prompt-len 128 --max-tokens 128 --max-num-seqs 64 \
      > "$L/$1.out" 2> "$L/$1.err"
  python3 - "$1" "$L/$1.out" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[2]) if l.startswith("RESULT ")]
if not lines:
    print(sys.argv[1], "no result"); sys.exit()
r = json.loads(lines[-1][7:]); d = r.get("decode", {})
print(sys.argv[1], "median %.3f mean %.3f p90 %.3f ms" % (d["median_step_ms"], d["mean_step_ms"], d["p90_step_ms"]),
      "init %.0f s" % r["init_s"])
PY
}
