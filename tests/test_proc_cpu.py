"""``bench/proc_cpu.py``: roles from command lines, and CPU seconds of a live child process (no Ray)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.proc_cpu import cpu_delta, cpu_seconds, role_of

# Burns 0.3 s of its own CPU (not wall time: a busy box cannot shorten it), then waits for stdin.
BURNER = """
import sys, time
print("ready", flush=True)
sys.stdin.readline()
start = time.process_time()
while time.process_time() - start < 0.3:
    pass
print("burnt", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("cmdline, role", [
    ("ray::ServeReplica:disagg-serve-disaggregated:DecodeServer", "decode"),
    ("ray::ServeReplica:app:DecodeServer.handle_request_streaming()", "decode"),
    ("ray::ServeReplica:app:PrefillServer", "prefill"),
    ("ray::ServeReplica:app:LLMServer", "replica"),
    ("ray::ServeReplica:app:OpenAIIngress", "ingress"),
    ("ray::ProxyActor", "proxy"),
    ("ray::ServeController", "controller"),
    ("ray::ServeReplica:app:ReplicaStatsBoard", "stats_board"),
    ("/usr/bin/python3\0-c\0from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5)\0"
     "--multiprocessing-fork\0", "engine_core"),
    ("ray::IDLE", "other_ray_workers"),
    ("/tmp/ray/session/gcs_server\0--port=0\0", "ray_system"),
])
def test_role_of(cmdline, role):
    assert role_of(cmdline) == role


def test_cpu_seconds_sees_a_named_child():
    child = subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        roles = {child.pid: "burner"}
        before = cpu_seconds(roles_by_pid=roles)
        assert "burner" in before  # alive and a descendant of this process
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "burnt"
        after = cpu_seconds(roles_by_pid=roles)
        burnt = cpu_delta(before, after)["burner"]
        assert 0.2 <= burnt < 5.0  # clock ticks (1/100 s) round the 0.3 s
        # Without the override the child's command line ("python -c ...") names no known role.
        assert "burner" not in cpu_seconds()
    finally:
        child.stdin.close()
        child.wait(timeout=10)
