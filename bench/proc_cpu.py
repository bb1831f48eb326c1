"""CPU time per role of this process and its descendants, read from ``/proc`` (Linux).

The benches start a private local Ray (``bench.routing_compare.start_ray``): ``ray.init``
spawns the GCS and the raylet as children of the bench process, the raylet spawns the
workers (Serve's proxy, controller and replicas are Ray actors), and a replica spawns its
engine process, so the whole cluster is the bench's process tree:

    bench ─┬─ gcs_server, raylet ─┬─ ray::ProxyActor, ray::ServeController
           │                      └─ ray::ServeReplica:<app>:<deployment> ── engine process
           └─ helpers the bench spawns itself (load clients, ...)

Each process gets a role from its command line (``role_of``; Ray sets a worker's to
``ray::<actor class>``, a Serve replica's actor class being ``ServeReplica:<app>:<deployment>``),
unless the caller names it (``roles_by_pid``: processes it spawned itself, whose command
line, e.g. ``multiprocessing.spawn``'s, would read as another role). ``cpu_seconds`` sums
user + system seconds per role; the difference of two snapshots (``cpu_delta``) is what
each role burned in between. CPU time, unlike wall time, barely moves with whatever else
loads the machine, so it is the steadier measure of serving overhead. A process that exits
between two snapshots drops out of both (its parent's ``cutime`` is not read): measure such
a process from inside it.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

# (substring of the command line, role), first match wins. The replica keys carry the ':' of
# "ServeReplica:<app>:<deployment>", so an app name cannot match them; no key is a substring
# of another's deployment name (":DecodeServer" and ":PrefillServer" never hit ":LLMServer").
ROLES = (("ProxyActor", "proxy"), (":OpenAIIngress", "ingress"),
         (":PrefillServer", "prefill"), (":DecodeServer", "decode"), (":LLMServer", "replica"),
         ("ServeController", "controller"), (":ReplicaStatsBoard", "stats_board"),
         ("multiprocessing.spawn", "engine_core"))  # a replica's engine process (KVMESH_ENGINE_PROCESS=1)
THREAD_ROLES = ("proxy", "ingress", "replica", "prefill", "decode", "engine_core")  # by_thread splits these


def role_of(cmdline: str) -> str:
    """The role of a process with this command line (``/proc/<pid>/cmdline``, NULs or spaces).

    A known key of ``ROLES``; else "other_ray_workers" for a Ray worker (``ray::...``), else
    "ray_system" (raylet, GCS, agents: the rest of the bench's tree).
    """
    role = next((r for key, r in ROLES if key in cmdline), None)
    if role is not None:
        return role
    return "other_ray_workers" if cmdline.startswith("ray::") else "ray_system"


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (one scan of ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _cpu_ticks(stat_path: str) -> int:
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode(errors="replace")


def cpu_seconds(by_thread: bool = False, roles_by_pid: Optional[Mapping[int, str]] = None) -> dict[str, float]:
    """CPU seconds (user + system) so far per role: this process ("bench") and its descendants.

    ``roles_by_pid`` names processes whose role the caller knows; it wins over ``role_of``.
    ``by_thread`` adds "role/thread name" entries for the roles of ``THREAD_ROLES``.
    """
    tick = os.sysconf("SC_CLK_TCK")
    roles_by_pid = roles_by_pid or {}
    out: dict[str, float] = {}
    for pid in _descendants(os.getpid()):
        try:
            cmd = _cmdline(pid)
            ticks = _cpu_ticks(f"/proc/{pid}/stat")
        except OSError:
            continue
        role = "bench" if pid == os.getpid() else roles_by_pid.get(pid) or role_of(cmd)
        out[role] = out.get(role, 0.0) + ticks / tick
        if by_thread and role in THREAD_ROLES:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/comm") as f:
                        key = f"{role}/{f.read().strip()}"
                    out[key] = out.get(key, 0.0) + _cpu_ticks(f"/proc/{pid}/task/{tid}/stat") / tick
                except OSError:
                    continue
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``after - before`` per role (3 decimals); a role missing from one side counts as 0 there."""
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 3) for k in sorted(set(before) | set(after))}


def per_token_ms(cpu: dict[str, float], num_tokens: int) -> dict[str, float]:
    """CPU ms per token per role; empty when no token was produced."""
    return {k: round(v * 1000 / num_tokens, 3) for k, v in cpu.items()} if num_tokens else {}


def role_pids(role: str) -> list[int]:
    """Pids of this process's descendants of one role ("replica", "ingress", "proxy", ...)."""
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            if pid != os.getpid() and role_of(_cmdline(pid)) == role:
                pids.append(pid)
        except OSError:
            continue
    return pids
