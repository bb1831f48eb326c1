"""Weights pulled into L2 while a decode step waits on something else.

At small batch a decode step reads every weight once, and HBM is the bottleneck only while a
GEMV runs. Between two GEMVs sit kernels that read almost nothing from HBM and wait on latency
instead: the RMSNorm (or, with tensor parallelism, the LL all-reduce + norm, which waits on the
peers over NVLink), the rotary + KV store and decode attention, SiLU-and-mul. For those
microseconds HBM idles. So the kernel that opens such a stretch starts a bulk L2 prefetch of
the first bytes of the weight the next GEMV reads (Hopper's ``cp.async.bulk.prefetch.L2``: one
instruction per chunk, nothing lands in registers, nothing waits for it), and that GEMV then
finds its first rows in L2 and streams the rest from HBM. Results are unchanged (a prefetch only
moves data into a cache); only time moves.

    site   kernel that issues it (after its PDL wait)        weight it prefetches
    norm   rms_norm / the LL all-reduce + norm                 qkv_proj, gate_up_proj
    attn   rotary + KV store (first of the attention kernels)  o_proj
    mlp    SiLU-and-mul                                        down_proj

``KVMESH_L2_PREFETCH``: megabytes per site, e.g. ``norm=16,attn=32,mlp=8``; ``0`` turns every
site off; unset means ``DEFAULT_MB``. Capped at half the GPU's L2 (the GEMV's own stream must
not evict what was prefetched before it reads it), only on Hopper or later, only for steps of
at most ``MAX_TOKENS`` tokens (decode batches; a prefill's GEMMs are compute-bound).
"""

from __future__ import annotations

import enum
import functools
import os
from typing import Optional

import torch

ENV = "KVMESH_L2_PREFETCH"
MAX_TOKENS = 256
ALIGN = 16  # bulk prefetch: 16-byte aligned address, size a multiple of 16


class Site(enum.Enum):
    NORM = "norm"
    ATTN = "attn"
    MLP = "mlp"


DEFAULT_MB = {Site.NORM: 16, Site.ATTN: 16, Site.MLP: 8}


def parse(value: Optional[str]) -> dict[Site, int]:
    """``KVMESH_L2_PREFETCH``'s value -> megabytes per site (unset: ``DEFAULT_MB``)."""
    if value is None or value.strip() == "":
        return dict(DEFAULT_MB)
    value = value.strip().lower()
    if value in ("0", "off", "false"):
        return {site: 0 for site in Site}
    mb = {site: 0 for site in Site}
    for item in value.split(","):
        name, sep, number = item.partition("=")
        try:
            site, megabytes = Site(name.strip()), int(number)
        except ValueError:
            raise ValueError(f"{ENV}={value!r}: expected 0 or site=MB pairs such as "
                             f"'norm=16,attn=16,mlp=8' (sites: {', '.join(s.value for s in Site)})") from None
        if not sep or megabytes < 0:
            raise ValueError(f"{ENV}={value!r}: '{item}' needs a size in MB >= 0")
        mb[site] = megabytes
    return mb


MEGABYTES = parse(os.environ.get(ENV))


def nbytes(site: Site, weight: Optional[torch.Tensor], tokens: int) -> int:
    """How many bytes of ``weight`` the kernel at ``site`` should prefetch in a step of
    ``tokens`` tokens: 0 for none."""
    if weight is None or not weight.is_cuda or tokens > MAX_TOKENS or MEGABYTES[site] == 0:
        return 0
    if weight.data_ptr() % ALIGN or not weight.is_contiguous() or not _has_bulk_prefetch(weight.device.index or 0):
        return 0
    limit = min(MEGABYTES[site] << 20, _l2_bytes(weight.device.index or 0) // 2)
    return min(weight.numel() * weight.element_size(), limit) // ALIGN * ALIGN


@functools.lru_cache(maxsize=None)
def _has_bulk_prefetch(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


@functools.lru_cache(maxsize=None)
def _l2_bytes(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).L2_cache_size)
