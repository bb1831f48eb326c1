"""`ray up cluster/onprem.yaml` for real: two "hosts" in a private network namespace.

    pytest ──▶ unshare --net --pid --mount --fork  python3 this_file --scenario REPO
                 │  (PID 1 of a private PID namespace: every process below dies with it)
                 ├─ lo up; tmpfs on /tmp; root's home -> /tmp/home (bind-mounted passwd copy)
                 ├─ sshd on 127.0.0.1:22 and 127.0.0.2:22, a fresh host key, one authorized key
                 ├─ ray up -y  (rendered onprem.yaml: head 127.0.0.1, worker 127.0.0.2)
                 │     head:   ray start --head ...; kvmesh serve tiny.yaml (detached)
                 │     worker: started by the head's autoscaler over SSH
                 ├─ wait for both nodes in the GCS; chat completion with the openai client on :8000
                 ├─ ray exec 'kill $(cat ~/kvmesh-serve.pid)'; ray down -y
                 └─ no process left but sshd; stop sshd; none left at all

The rendered config differs from cluster/onprem.yaml only where two hosts sharing one
kernel need it (printed on failure): addresses and SSH user/key, no `pip install`
(kvmesh is already installed here), the served config is configs/tiny.yaml, and the
worker's `ray start` gets its own node IP, temp dir and ports and no `ray stop` (that
would stop the head, which shares this PID namespace).

The namespaces keep the test from touching the host: `ray stop` (run by `ray down` and
the start commands) only sees processes of this PID namespace, /tmp/ray is a private
tmpfs, and the network is private, so no port can collide with other Ray clusters.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"
HTTP_PORT = 8000
SCENARIO_TIMEOUT_S = 540
UNSHARE = ["unshare", "--net", "--pid", "--mount", "--fork", "--mount-proc", "--kill-child"]


def why_not_runnable() -> Optional[str]:
    """None when the scenario can run here, else the precise reason to skip."""
    if not sys.platform.startswith("linux"):
        return "needs Linux namespaces"
    if os.geteuid() != 0:
        return "needs root (sshd with privilege separation, mounts in a private namespace)"
    tools = {"unshare": "util-linux", "ip": "iproute2", "ssh": "openssh-client",
             "ssh-keygen": "openssh-client", "rsync": "rsync", "mount": "util-linux"}
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian package {package})"
    if not Path("/usr/sbin/sshd").exists():
        return "/usr/sbin/sshd not found (Debian package openssh-server; .ci/run installs it)"
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None and shutil.which("ray") is None:
        return "the ray CLI is not installed (pip install 'kvmesh[serve]')"
    probe = subprocess.run(UNSHARE + ["true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --net --pid --mount is not permitted here: {probe.stderr.strip()}"
    return None


@pytest.mark.slow
@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 60)
def test_ray_up_onprem_serves_chat_completion():
    reason = why_not_runnable()
    if reason:
        pytest.skip(reason)
    start = time.monotonic()
    try:
        proc = subprocess.run(UNSHARE + [sys.executable, __file__, "--scenario", str(REPO)],
                              capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:  # --kill-child: the namespace dies with unshare
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"scenario ran over {SCENARIO_TIMEOUT_S}s\n{out[-6000:]}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"scenario failed (rc {proc.returncode}):\n{output[-12000:]}"
    result_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert result_lines, output[-6000:]
    result = json.loads(result_lines[-1][len("RESULT "):])
    print(f"ray up on-prem scenario: {result} (test wall {time.monotonic() - start:.1f}s)")
    assert len(result["node_ips"]) == 2 and WORKER_IP in result["node_ips"]
    assert result["completion_tokens"] > 0
    assert result["leftover_processes"] == []


# ---- the scenario, run as PID 1 of the private namespaces ------------------------------------
def render_config(repo: Path, key_path: Path, config_name: str = "tiny.yaml") -> dict:
    """cluster/onprem.yaml for two hosts on one kernel (see the module docstring)."""
    cfg = yaml.safe_load((repo / "cluster" / "onprem.yaml").read_text())
    cfg = copy.deepcopy(cfg)
    cfg["cluster_name"] = "kvmesh-onprem-ci"
    cfg["provider"].update(head_ip=HEAD_IP, worker_ips=[WORKER_IP])
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(key_path)}
    cfg["min_workers"] = cfg["max_workers"] = 1
    cfg["file_mounts"] = {"~/kvmesh-configs": str(repo / "configs")}
    cfg["setup_commands"] = []
    head = [c for c in cfg["head_start_ray_commands"]]
    serve = [i for i, c in enumerate(head) if "kvmesh serve" in c]
    assert len(serve) == 1, "onprem.yaml: expected one head start command running kvmesh serve"
    old = head[serve[0]]
    head[serve[0]] = old.replace(old.split("KVMESH_CONFIG=", 1)[1].split(";", 1)[0],
                                 f"~/kvmesh-configs/{config_name}")
    cfg["head_start_ray_commands"] = head
    workers = [c for c in cfg["worker_start_ray_commands"] if c.strip() != "ray stop"]
    assert len(workers) == 1 and "ray start --address=$RAY_HEAD_IP:6379" in workers[0], workers
    # Distinct ports and temp dir: the head's raylet already uses the defaults on this kernel.
    workers[0] += (f" --node-ip-address={WORKER_IP} --temp-dir=/tmp/ray-worker"
                   " --node-manager-port=20101 --object-manager-port=20102 --metrics-export-port=20103"
                   " --dashboard-agent-listen-port=20104 --dashboard-agent-grpc-port=20105"
                   " --runtime-env-agent-port=20106 --min-worker-port=20200 --max-worker-port=20999")
    cfg["worker_start_ray_commands"] = workers
    return cfg


def _sh(cmd: list[str], env: dict, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _reap() -> None:
    """We are PID 1: collect the exit status of orphans (Ray's daemons double-fork)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _processes() -> dict[int, str]:
    """Live processes of this PID namespace but us: pid -> command line."""
    _reap()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, IndexError):
            continue
        found[int(entry.name)] = cmdline or stat.split("(", 1)[1].split(")", 1)[0]
    return found


def _wait_for(what: str, check, timeout_s: float, period_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # not ready yet
            last_error = exc
        time.sleep(period_s)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s (last error: {last_error!r})")


def _setup_host(repo: Path, work: Path) -> tuple[dict, Path, subprocess.Popen]:
    """Loopback, private /tmp and home, keys, sshd. Returns (env for the ray CLI, client key, sshd)."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # A checkout under /tmp (CI clones may live there) must stay visible at its own path once
    # the private tmpfs covers /tmp: park a bind mount of it outside /tmp, then put it back.
    repo_under_tmp = Path("/tmp") in repo.resolve().parents
    parked = Path("/run/kvmesh-ray-up-repo")
    if repo_under_tmp:
        parked.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(repo), str(parked)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", "/tmp"], check=True)
    if repo_under_tmp:
        repo.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(parked), str(repo)], check=True)
    home = Path("/tmp/home")
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    home.chmod(0o700)
    passwd = Path("/tmp/passwd")
    lines = []
    for line in Path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "root":
            fields[5] = str(home)
        lines.append(":".join(fields))
    passwd.write_text("\n".join(lines) + "\n")
    subprocess.run(["mount", "--bind", str(passwd), "/etc/passwd"], check=True)

    key = home / ".ssh" / "id_ed25519"
    host_key = work / "ssh_host_ed25519_key"
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    (home / ".ssh" / "authorized_keys").write_text(Path(f"{key}.pub").read_text())

    # Remote shells run `bash --login -i -c 'source ~/.bashrc; ...'`: give them this Python.
    bin_dir = home / "bin"
    bin_dir.mkdir()
    python_bin = Path(sys.executable).parent
    if shutil.which("kvmesh", path=str(python_bin)) is None and shutil.which("kvmesh") is None:
        # Not pip-installed (a bare checkout): the same entry point, from the source tree.
        shim = bin_dir / "kvmesh"
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m cluster.cli \"$@\"\n")
        shim.chmod(0o755)
    (home / ".bashrc").write_text(
        f"export PATH={bin_dir}:{python_bin}:$PATH\n"
        f"export PYTHONPATH={repo}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        "export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0\n")

    Path("/run/sshd").mkdir(exist_ok=True)  # Debian sshd's privilege-separation directory
    config = work / "sshd_config"
    config.write_text(
        f"Port 22\nListenAddress {HEAD_IP}\nListenAddress {WORKER_IP}\nHostKey {host_key}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"PidFile {work / 'sshd.pid'}\nMaxStartups 100\nMaxSessions 100\n")
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                            stdout=open(work / "sshd.log", "w"), stderr=subprocess.STDOUT)
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{python_bin}:{os.environ['PATH']}",
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    for ip in (HEAD_IP, WORKER_IP):
        _wait_for(f"sshd on {ip}", lambda ip=ip: socket.create_connection((ip, 22), timeout=1).close()
                  or True, 10, 0.1)
    return env, key, sshd


def _alive_node_ips() -> list[str]:
    """IPs of the cluster's alive nodes, straight from the GCS (`ray status` takes ~15 s here)."""
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo
    nodes = GcsClient(address=f"{HEAD_IP}:6379").get_all_node_info(timeout=15)
    return sorted(n.node_manager_address for n in nodes.values() if n.state == GcsNodeInfo.ALIVE)


def scenario(repo: Path) -> dict:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    work_root = Path("/tmp")  # a private tmpfs once _setup_host has run
    env, key, sshd = _setup_host(repo, work_root)
    work = Path("/tmp/work")
    work.mkdir()
    cluster_yaml = work / "onprem-ci.yaml"
    cluster_yaml.write_text(yaml.safe_dump(render_config(repo, key), sort_keys=False))
    timings["setup_s"] = time.monotonic() - t0
    is_up = False
    try:
        t = time.monotonic()
        _sh(["ray", "up", "-y", "--no-config-cache", str(cluster_yaml)], env, 180)
        is_up = True
        timings["ray_up_s"] = time.monotonic() - t
        # A raylet must register within 30 s (hard-coded in Ray) or `ray start` fails; on a
        # loaded machine the autoscaler then retries the worker, hence the long wait.
        # The head's own IP is whatever Ray detects (no route out of the namespace: it falls
        # back to the hostname's address); the worker is started with --node-ip-address.
        node_ips = _wait_for("the worker to join", lambda: WORKER_IP in (ips := _alive_node_ips())
                             and len(ips) == 2 and ips, 240, 1)
        timings["worker_joined_s"] = time.monotonic() - t

        base = f"http://{HEAD_IP}:{HTTP_PORT}"
        _wait_for("kvmesh /v1/models", lambda: urllib.request.urlopen(f"{base}/v1/models", timeout=2)
                  .status == 200, 180, 1)
        timings["serving_s"] = time.monotonic() - t
        from openai import OpenAI
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        t = time.monotonic()
        reply = client.chat.completions.create(
            model="kvmesh-tiny", max_tokens=8, temperature=0.0,
            messages=[{"role": "user", "content": "Say hello to the cluster."}])
        timings["chat_s"] = time.monotonic() - t
        completion_tokens = reply.usage.completion_tokens
        assert reply.choices[0].finish_reason in ("length", "stop"), reply

        t = time.monotonic()
        _sh(["ray", "exec", str(cluster_yaml), "kill $(cat ~/kvmesh-serve.pid)"], env, 60)
        _wait_for("kvmesh serve to exit", lambda: not any("kvmesh serve" in c or "cluster.cli serve" in c
                                                       for c in _processes().values()), 60, 0.5)
        _sh(["ray", "down", "-y", str(cluster_yaml)], env, 120)
        is_up = False
        timings["down_s"] = time.monotonic() - t
        # SSH control masters persist 10 s after their last command (Ray's ControlPersist).
        try:
            _wait_for("all processes but sshd to exit",
                      lambda: set(_processes()) <= {sshd.pid} or None, 60, 0.5)
        except TimeoutError:
            pass
        leftover = [c for p, c in _processes().items() if p != sshd.pid]
    finally:
        if is_up:  # a failure half-way: still take the cluster down, and show why it failed
            _sh(["ray", "down", "-y", str(cluster_yaml)], env, 120, check=False)
            try:
                print(f"alive nodes: {_alive_node_ips()}", flush=True)
            except Exception as exc:
                print(f"alive nodes: {exc!r}", flush=True)
            for log in [Path("/tmp/home/kvmesh-serve.log"), Path("/tmp/ray/session_latest/logs/monitor.out")]:
                if log.exists():
                    print(f"---- {log} ----\n{log.read_text()[-3000:]}", flush=True)
            print(f"---- rendered config ----\n{cluster_yaml.read_text()}", flush=True)
        sshd.send_signal(signal.SIGTERM)
        sshd.wait(timeout=10)
    _wait_for("sshd sessions to exit", lambda: not _processes() or None, 20, 0.5)
    timings["total_s"] = time.monotonic() - t0
    return {"node_ips": node_ips, "completion_tokens": completion_tokens,
            "leftover_processes": leftover + list(_processes().values()),
            **{k: round(v, 1) for k, v in timings.items()}}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--scenario":
        assert os.getpid() == 1, "run inside `unshare --pid --fork` (see the module docstring)"
        result = scenario(Path(sys.argv[2]))
        print("RESULT " + json.dumps(result), flush=True)
    else:
        sys.exit(f"usage: {sys.argv[0]} --scenario REPO (run by pytest, inside unshare)")
