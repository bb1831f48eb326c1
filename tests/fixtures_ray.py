"""A private local Ray cluster for the test session.

Free ports, a private temp dir, auth and usage stats off; never `ray stop`
(that would kill every Ray on the host). Fractional CPUs are used by the
deployments so several replicas fit on a 2-core machine.
"""

from __future__ import annotations

import os
import tempfile

import pytest

from tests.fixtures_redis import free_port


def ray_env() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """ray.init on a private temp dir; yields the ray module. Shut down at session end."""
    ray_env()
    ray = pytest.importorskip("ray")
    temp_dir = tempfile.mkdtemp(prefix="kvmesh-ray-")
    # 4 logical CPUs on the 2-core CI box (fractional replicas); more on a GPU host, where each
    # GPU worker of a TP=4 group takes a whole CPU.
    num_cpus = max(4, min(os.cpu_count() or 4, 16))
    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir,
             dashboard_port=None, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}})
    yield ray
    try:
        from ray import serve
        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_http_port(ray_cluster):
    """Starts Serve's HTTP proxy on a free port once per session; yields the port."""
    from ray import serve
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port
