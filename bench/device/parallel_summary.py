"""Prints a bench/parallel.py result in a few lines (the device scripts' output tail).

    python3 bench/device/parallel_summary.py $OUT/parallel.json [--ranks N] [--rows N] [--idle-before]
"""
from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path")
    ap.add_argument("--ranks", type=int, default=2, help="ranks whose kernel profile to print")
    ap.add_argument("--rows", type=int, default=14, help="kernels a rank")
    ap.add_argument("--idle-before", action="store_true", help="also the kernels that device idle time precedes")
    args = ap.parse_args()
    if not os.path.exists(args.path):
        print(f"{args.path} missing")
        return
    d = json.load(open(args.path))
    t = d.get("throughput", {})
    print("ratio", d.get("decode_step_ratio_vs_tp1"), "tok/s tp1x2", t.get("tp1_x2_output_tok_s"),
          "tp2x1", t.get("tp2_x1_output_tok_s"))
    for ranks, r in sorted(d.get("allreduce", {}).items()):  # (KiB, our bus GB/s, raw NCCL's)
        sizes = r.get("sizes") or {}
        print("allreduce", ranks, "ranks", r.get("error", ""),
              [(int(s) >> 10, round(v["ours"]["busbw_GBps"], 1), round(v["raw_cupy"]["busbw_GBps"], 1))
               for s, v in sorted(sizes.items(), key=lambda kv: int(kv[0]))])
    for tp, r in d.get("decode", {}).items():
        dec = (r.get("decode") or {}) if isinstance(r, dict) else {}
        prof = dec.get("profile") or {}
        print(" TP", tp, "step ms", round(dec.get("median_step_ms", 0), 3),
              "profiled", round(prof.get("median_step_ms", 0), 3))
        skew = dec.get("rank_skew") or {}
        if skew.get("turnaround_us"):
            print("  driver turnaround us (last reply -> next read)", skew["turnaround_us"])
        for rank in skew.get("ranks", []):
            print("  rank", rank["rank"], "reads late us", rank["late_read_us"],
                  *(("launch us", rank["launch_us"], "wait us", rank["wait_us"]) if "launch_us" in rank else ()),
                  "runs us", rank["run_us"], "replies us", rank["reply_us"], "last to read", rank["last_to_read"])
        for rank in (prof.get("ranks") or [])[:args.ranks]:
            print("  rank", rank["rank"], "kernel us/step", round(rank["kernel_us_per_step"], 1),
                  "idle", rank.get("idle_us_per_step"))
            if rank.get("gemv_tuning"):
                print("   batch-1 linears (us a call; use):", {shape: (r.get("row"), r.get("cublas"), r["use"])
                                                             for shape, r in rank["gemv_tuning"].items()})
            if rank.get("host_api"):
                print("   host CUDA calls us/step:", [(row["name"][:32], round(row["us_per_step"], 1),
                                                      round(row["calls_per_step"], 1)) for row in rank["host_api"][:6]])
            if args.idle_before:
                print("   idle before:", [(row["name"][:40], round(row["us_per_step"], 1), row["calls_per_step"])
                                         for row in rank.get("idle_before", [])[:6]])
            for row in rank["rows"][:args.rows]:
                print("   ", round(row["us_per_step"], 1), round(row["calls_per_step"], 1), row["name"][:70])


if __name__ == "__main__":
    main()
