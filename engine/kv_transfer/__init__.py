"""KV transfer between replicas for disaggregated prefill and decode.

| module | what it holds |
|---|---|
| `plan.py` | the dataclasses both sides and the router exchange (no torch, no Ray) |
| `leases.py` | the scheduler's side: reserved blocks under a lease, exports (no torch) |
| `blocks.py` | gather blocks into one staging tensor / scatter one back |
| `base.py` | `KVTransportKind`, the pair-communicator interface |
| `gloo.py`, `nccl.py` | pair communicators: torch gloo (CPU, CI), CuPy NCCL (GPU) |
| `mailbox.py` | the control mailbox interface, in-process and Ray-actor kinds (serving uses `router/kv_mailbox.py`'s TCP one) |
| `transport.py` | `KVSender` / `KVReceiver`: one request's KV over a pair |

Nothing here is imported by ``engine/__init__``; only ``plan`` and ``leases`` are
imported by the scheduler side, and neither imports torch.
"""
