"""Rendezvous (highest random weight) hashing of blobs over cache nodes: each blob has one
preferred cache node across the cluster, the same for every node daemon and for the prewarm
service, so the cache nodes' stores shard the images instead of all holding everything."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def rendezvous_key(address: str, digest: str) -> bytes:
    """The blob's score at a cache node: the highest scoring node serves it first."""
    return hashlib.sha256((address + digest).encode()).digest()


def rendezvous_order(addresses: Sequence[str], digest: str) -> list[str]:
    """``addresses`` in the order ``digest`` is asked from them."""
    return sorted(addresses, key=lambda a: rendezvous_key(a, digest), reverse=True)
