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
