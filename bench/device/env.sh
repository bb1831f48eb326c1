# Sourced first by every bench/device/*.sh: the Python packages the device machine lacks (Ray,
# FastAPI, openai, ...) from the carried bundle (.gpubundle, ../shared/tools/gpu-bundle), the
# repo on the path, a private Ray's settings, and $L for the logs that come back in logs.tgz.
mkdir -p /tmp/site && tar -xJf .gpubundle/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export PYTHONUNBUFFERED=1
L=/tmp/logs; mkdir -p $L
