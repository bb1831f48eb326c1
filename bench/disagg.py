"""KV transfer throughput between two replicas' workers vs a raw point-to-point send of the same bytes.

Two Ray actors, one device each, hold a paged KV cache of a model shape (default:
Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128, bf16, 16-token blocks). For
each prompt length, the prompt's blocks (random block ids) go through the real
path: ``gather_blocks`` into a staging tensor, ``KVSender`` (header through the
decode side's Ray mailbox, bytes over the pair), ``KVReceiver``, ``scatter_blocks``
into the receiver's cache. Timed from before the gather to after the scatter
(both sides synchronized, ``time.time()`` on one node). The baseline sends one
contiguous buffer of the same size over a bare communicator of the same kind
(CuPy NCCL on GPU, gloo on CPU), synchronized on both sides.

    python bench/disagg.py --transport nccl --out bench/results/disagg_h100.json     # 2 GPUs
    python bench/disagg.py --transport gloo --layers 4 --lengths 256 1024           # CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402
import torch  # noqa: E402


class _Side:
    def __init__(self, transport: str, shape: dict, num_blocks: int) -> None:
        from engine.attention.base import allocate_kv_cache
        from engine.kv_transfer.base import create_backend
        self.transport = transport
        self.device = torch.device("cuda", 0) if transport == "nccl" else torch.device("cpu")
        dtype = getattr(torch, shape["dtype"])
        self.kv_caches = allocate_kv_cache(shape["layers"], num_blocks, shape["block_size"], shape["kv_heads"],
                                           shape["head_dim"], dtype, self.device)
        for cache in self.kv_caches:
            cache.normal_()
        self.backend = create_backend(transport, self.device)
        self.arrivals: dict[str, tuple[float, float]] = {}
        self.raw_comm = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- the KV path ----------------------------------------------------------------------------
    def start_receiver(self):
        from engine.kv_transfer.mailbox import RayMailbox
        from engine.kv_transfer.plan import KVEndpoint
        self.mailbox = RayMailbox.create()
        self.block_ids: dict[str, list[int]] = {}
        return KVEndpoint("bench-decode", self.mailbox)

    async def run_receiver(self) -> None:
        from engine.kv_transfer.blocks import scatter_blocks
        from engine.kv_transfer.transport import KVReceiver

        def on_arrival(arrival):
            assert arrival.error is None, arrival.error
            scatter_blocks(self.kv_caches, self.block_ids[arrival.header.request_id], arrival.kv)
            self.sync()
            self.arrivals[arrival.header.request_id] = (time.time(), arrival.transfer_s)

        self.receiver = KVReceiver(self.backend, self.mailbox, on_arrival, timeout_s=120)
        asyncio.get_running_loop().create_task(self.receiver.run(poll_s=0.2))

    def expect(self, request_id: str, block_ids: list[int]) -> None:
        self.block_ids[request_id] = block_ids

    async def arrival(self, request_id: str) -> tuple[float, float]:
        while request_id not in self.arrivals:
            await asyncio.sleep(0.001)
        return self.arrivals.pop(request_id)

    async def send(self, endpoint, request_id: str, block_ids: list[int]) -> tuple[float, float, float, int]:
        from engine.kv_transfer.blocks import gather_blocks
        from engine.kv_transfer.plan import KVReservation, KVTransferPlan
        from engine.kv_transfer.transport import KVSender
        if not hasattr(self, "sender"):
            self.sender = KVSender(self.backend, "bench-prefill", timeout_s=120)
        plan = KVTransferPlan(KVReservation(request_id, request_id, 0, tuple(block_ids), 0, 60.0), endpoint)
        self.sync()
        start = time.time()
        kv = gather_blocks(self.kv_caches, block_ids)
        self.sync()
        gathered = time.time()
        send_s = await self.sender.send(plan, kv, first_token_id=0)
        return start, gathered - start, send_s, kv.numel() * kv.element_size()

    # ---- raw baseline ---------------------------------------------------------------------------
    def raw_rendezvous(self):
        return self.backend.new_rendezvous()

    def raw_connect(self, info, rank: int) -> None:
        self.raw_comm = self.backend.connect(info, rank, 120)
        self.raw_rank = rank

    def raw(self, nbytes: int, iters: int) -> list[float]:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        times = []
        for _ in range(iters):
            self.sync()
            start = time.perf_counter()
            (self.raw_comm.send if self.raw_rank == 0 else self.raw_comm.recv)(buf, 120)
            self.sync()
            times.append(time.perf_counter() - start)
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=["nccl", "gloo"], default="nccl")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shape = {"layers": args.layers, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": args.dtype,
             "block_size": args.block_size}
    max_blocks = max(args.lengths) // args.block_size
    num_blocks = 2 * max_blocks + 8
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    gpus = 1 if args.transport == "nccl" else 0
    side = ray.remote(num_gpus=gpus, num_cpus=0.5)(_Side)
    sender, receiver = side.remote(args.transport, shape, num_blocks), side.remote(args.transport, shape, num_blocks)
    endpoint = ray.get(receiver.start_receiver.remote())
    ray.get(receiver.run_receiver.remote())
    info = ray.get(sender.raw_rendezvous.remote())
    ray.get([sender.raw_connect.remote(info, 0), receiver.raw_connect.remote(info, 1)])
    rng = __import__("random").Random(0)
    rows = []
    for length in args.lengths:
        n = length // args.block_size
        kv_total, kv_send, kv_gather, nbytes = [], [], [], 0
        for i in range(args.iters + 1):  # the first round creates the pair: not timed
            request_id = f"len{length}-{i}"
            src = rng.sample(range(num_blocks), n)
            dst = rng.sample(range(num_blocks), n)
            ray.get(receiver.expect.remote(request_id, dst))
            start, gather_s, send_s, nbytes = ray.get(sender.send.remote(endpoint, request_id, src))
            arrived_at, recv_s = ray.get(receiver.arrival.remote(request_id))
            if i:
                kv_total.append(arrived_at - start)
                kv_send.append(send_s)
                kv_gather.append(gather_s)
        raw = ray.get([sender.raw.remote(nbytes, args.iters + 1), receiver.raw.remote(nbytes, args.iters + 1)])
        raw_s = [max(a, b) for a, b in zip(*raw)][1:]
        gb = nbytes / 1e9
        row = {"prompt_tokens": length, "num_blocks": n, "bytes": nbytes,
               "kv_path_s_median": statistics.median(kv_total), "kv_path_GBps": gb / statistics.median(kv_total),
               "kv_send_only_GBps": gb / statistics.median(kv_send),
               "gather_s_median": statistics.median(kv_gather),
               "raw_s_median": statistics.median(raw_s), "raw_GBps": gb / statistics.median(raw_s)}
        row["kv_path_vs_raw"] = row["kv_path_GBps"] / row["raw_GBps"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    devices = "cpu"
    if args.transport == "nccl":
        devices = ray.get(ray.remote(num_gpus=1)(lambda: torch.cuda.get_device_name(0)).remote())
    result = {"transport": args.transport, "device": devices, "shape": shape, "iters": args.iters,
              "method": "median over iters; kv path = before gather -> after scatter (both synced); "
                        "raw = one contiguous buffer send/recv on a bare pair, max of both sides",
              "rows": rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
