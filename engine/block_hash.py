"""The one definition of a KV block's hash, shared by the engine and the router.

A full block's hash chains its parent's hash, its own token ids and an optional
salt, so equal hashes mean equal whole prefixes (up to 64-bit collisions)::

    h0 = H(ROOT, tokens[0:bs], salt)   h1 = H(h0, tokens[bs:2bs], salt)   ...

Only full blocks are hashed: a partial last block may still change. The router's
prefix index calls ``block_hash_chain`` on the rendered prompt's token ids with
the engine's block size, so both sides always agree. Plain Python, no torch.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Optional, Sequence

ROOT_HASH = 0  # parent hash of the first block


def hash_block(parent_hash: int, token_ids: Sequence[int], salt: Optional[str] = None) -> int:
    """64-bit hash of one full block given its parent's hash."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent_hash))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if salt:
        h.update(b"\x00salt\x00" + salt.encode())
    return int.from_bytes(h.digest(), "little")


def block_hash_chain(token_ids: Sequence[int], block_size: int, salt: Optional[str] = None,
                     start: Sequence[int] = ()) -> list[int]:
    """Hashes of every full block of ``token_ids``.

    ``start`` holds hashes already computed for the first blocks (a request's
    chain grows as it decodes); only the remaining full blocks are hashed.
    """
    hashes = list(start)
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], salt)
        hashes.append(parent)
    return hashes
