"""Which process stalled while the load client waited (issue #6's ITL tails).

``bench/disagg_serve.py`` runs its servers with ``KVMESH_STEP_TIMELINE=1``
(engine/step_timeline.py). After a mode's load it calls, from here:

    fetch_timelines          every engine replica's ``step_timeline_summary`` over the load window
    attribute_client_stalls  moments when several short client streams waited at once
                             (``client_stall_clusters``), each against the replicas' long step gaps
                             and loop lags, the ingress's loop lags (``GET /kvmesh/timeline``) and
                             the client's own (``mixed_workload.drive(probe=)``)
    print_timelines / print_attribution   the tables the benchmark prints

All times are the host's monotonic clock, which every process on it shares.
"""

from __future__ import annotations

from typing import Optional

from router.config import DeploymentConfig


def fetch_timelines(cfg: DeploymentConfig, window: tuple[float, Optional[float]], top: int = 20,
                    timeout_s: float = 60.0) -> dict[str, dict]:
    """Every engine replica's ``step_timeline_summary`` over ``window``, by "<pool>:<replica id>".

    A handle call reaches one replica of its deployment, chosen by Serve's router, so each
    deployment is asked in rounds of concurrent calls (the router spreads calls in flight over
    replicas; sequential ones may all land on one) until every replica has answered, at most
    5 rounds.
    """
    from ray import serve

    from router.app import DECODE_NAME, PREFILL_NAME, REPLICA_NAME
    d = cfg.disaggregation
    deployments = ({DECODE_NAME: d.decode.replicas.min_replicas, PREFILL_NAME: d.prefill.replicas.min_replicas}
                   if d.is_disaggregated else {REPLICA_NAME: cfg.replicas.min_replicas})
    out: dict[str, dict] = {}
    for name, want in deployments.items():
        handle = serve.get_deployment_handle(name, cfg.name)
        seen: set[str] = set()
        for _ in range(5):
            calls = [handle.step_timeline_summary.remote(top, *window) for _ in range(2 * want)]
            for call in calls:
                summary = call.result(timeout_s=timeout_s)
                seen.add(summary["replica_id"])
                out[f"{summary['pool']}:{summary['replica_id']}"] = summary
            if len(seen) >= want:
                break
    return out


def client_stall_clusters(records: list, t0: float, min_itl_s: float = 0.03, window_s: float = 0.02,
                          min_streams: int = 4) -> list[dict]:
    """Moments when several short streams waited > ``min_itl_s`` for a token at once (one
    cause held them all): clusters of such waits starting within ``window_s`` of each other.
    ``burst``: the share of those streams whose next token came < 1 ms later (the tokens were
    made in time but delivered late: a delivery-path stall, not an engine one)."""
    waits = []
    for r in records:
        if not r.ok or r.kind != "short":
            continue
        t = r.start_s + r.ttft_s
        for i, g in enumerate(r.itl_s):
            t += g
            if g > min_itl_s:
                nxt = r.itl_s[i + 1] if i + 1 < len(r.itl_s) else None
                waits.append((t0 + t - g, t0 + t, nxt is not None and nxt < 0.001))
    waits.sort()
    clusters: list[list] = []
    for w in waits:
        if clusters and w[0] - clusters[-1][0][0] < window_s:
            clusters[-1].append(w)
        else:
            clusters.append([w])
    out = []
    for c in clusters:
        if len(c) < min_streams:
            continue
        start, end = max(w[0] for w in c), min(w[1] for w in c)  # when all of them were waiting
        if end <= start:
            start, end = min(w[0] for w in c), min(w[1] for w in c)
        out.append({"start_s": start, "end_s": end, "streams": len(c),
                    "burst": round(sum(w[2] for w in c) / len(c), 2)})
    return out


def attribute_client_stalls(records: list, entry: dict, slack_s: float = 0.005) -> dict:
    """Which process was stalled while the clients waited: each client stall cluster against the
    engine replicas' long step gaps and loop lags, the ingress's loop lags and the client's own."""
    t0 = entry["client"]["t0_monotonic_s"]
    if t0 is None:
        return {"error": "no client time origin"}
    sources: dict[str, list[tuple[float, float]]] = {}
    for key, t in (entry.get("timeline") or {}).items():
        if t.get("enabled"):
            sources[f"{key} step gap"] = _spans(t["t0_monotonic_s"], t["top_gaps"], min_ms=20)
            sources[f"{key} loop lag"] = _spans(t["t0_monotonic_s"], t["top_loop_lags"], min_ms=10)
    ingress = entry.get("ingress_timeline") or {}
    if ingress.get("enabled"):
        sources["ingress loop lag"] = _spans(ingress["t0_monotonic_s"], ingress["top_loop_lags"], min_ms=10)
    client_lags = [{"t_s": a, "ms": ms} for a, ms in entry["client"]["loop_lags"]]
    sources["client loop lag"] = _spans(t0, client_lags, min_ms=10)
    clusters = client_stall_clusters(records, t0)
    for c in clusters:
        c["overlaps"] = [name for name, spans in sources.items()
                         if any(a - slack_s < c["end_s"] and b + slack_s > c["start_s"] for a, b in spans)]
    return {"num_clusters": len(clusters),
            "mean_burst": round(sum(c["burst"] for c in clusters) / len(clusters), 2) if clusters else None,
            "overlapped_by": {name: sum(name in c["overlaps"] for c in clusters) for name in sources},
            "unexplained": sum(not c["overlaps"] for c in clusters),
            "clusters": [{"start_s": round(c["start_s"] - t0, 3), "ms": round((c["end_s"] - c["start_s"]) * 1e3, 1),
                          "streams": c["streams"], "burst": c["burst"], "overlaps": c["overlaps"]}
                         for c in clusters[:60]]}


def _spans(base: float, rows: list[dict], min_ms: float) -> list[tuple[float, float]]:
    """(start, end) monotonic seconds of summary rows (``t_s`` after ``base``, ``ms`` long)."""
    return [(base + r["t_s"], base + r["t_s"] + r["ms"] / 1e3) for r in rows if r["ms"] > min_ms]


def print_attribution(mode: str, a: dict) -> None:
    if "error" in a:
        print(f"[{mode}] stall attribution: {a['error']}", flush=True)
        return
    print(f"\n[{mode}] client stall clusters (>= 4 short streams waiting > 30 ms at once): {a['num_clusters']}, "
          f"mean burst share {a['mean_burst']}, unexplained {a['unexplained']}; overlapped by: "
          + ", ".join(f"{k} {v}" for k, v in a["overlapped_by"].items() if v), flush=True)
    for c in a["clusters"][:12]:
        print(f"  t={c['start_s']:.3f}s {c['ms']:.0f} ms, {c['streams']} streams, burst {c['burst']}: "
              f"{', '.join(c['overlaps']) or '-'}", flush=True)


def print_timelines(mode: str, timelines: dict[str, dict], top: int = 10) -> None:
    """Per replica: gap quantiles, the causes of gaps above the stall threshold, the top gaps."""
    for key, t in timelines.items():
        if not t.get("enabled"):
            print(f"[{mode}] {key}: step timeline off", flush=True)
            continue
        gaps, stalls = t["gap_ms"], t["stalls"]["gaps"]
        quantiles = " ".join(f"{q} {gaps[q]:.1f}" for q in ("p50", "p99", "p99.9", "max") if q in gaps)
        fractions = " ".join(f"{k} {v:.2f}" for k, v in stalls["overlap_fraction"].items() if v)
        print(f"\n[{mode}] {key}: {t['num_steps']} steps; gap ms {quantiles}; "
              f"{stalls['count']} gaps > {t['stall_ms']:.0f} ms, overlapping: {fractions or '-'}; "
              f"{t['stalls']['steps']['count']} steps > {t['stall_ms']:.0f} ms; gc {t['gc']}", flush=True)
        print(f"{'t_s':>9}{'gap ms':>9}{'step':>8}{'between':>9}{'prefill':>9}{'running':>9}  overlapping")
        for g in t["top_gaps"][:top]:
            print(f"{g['t_s']:>9.3f}{g['ms']:>9.1f}{g['step_ms']:>8.1f}{g['between_ms']:>9.1f}"
                  f"{g['num_prefill_tokens']:>9}{g['num_running']:>9}  "
                  f"{', '.join(_overlap_text(e) for e in g['overlaps'] if _worth_printing(e)) or '-'}", flush=True)


def _worth_printing(e: dict) -> bool:
    """The table leaves out sub-millisecond stats refreshes and GC pauses (the JSON keeps them)."""
    return e["kind"] not in ("stats_refresh", "gc") or e["ms"] >= 1.0


def _overlap_text(e: dict) -> str:
    kind, ms = e["kind"], e["ms"]
    if kind == "gc":
        return f"gc gen{e['generation']} {ms:.1f}ms"
    if kind == "kv_recv":
        return f"kv_recv {ms:.1f}ms (alloc {e['alloc_ms']:.1f}) {e['num_bytes'] / 2**20:.0f}MiB"
    return f"{kind} {ms:.1f}ms"
