"""Blocks of accounts' repos kept between the jobs of one account (content-addressed, so never stale).

Verified mode walks each of an account's collections in its own job; the MST nodes near the root, the
probe's proof path and, for small repos fetched whole, every block, serve the account's next collections
without another request. Bounded by what its blocks cost in memory (their bytes and
:data:`BLOCK_OVERHEAD` each, so a flood of tiny blocks is bounded too), least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict

from daemon.atproto.cid import Cid

# 4 MiB: as fast as 16 MiB on the benchmark's shapes, with 14-16 MiB less peak RSS in verified mode
# (bench/results/2026-12-01T131528Z.json); still room for a few whole small repos and the upper nodes of
# many accounts between the jobs of their collections.
DEFAULT_CACHE_BYTES = 4 * 1024 * 1024
# What one kept block costs in memory beyond its bytes (the bytes objects of its data and CID, the dict
# slot): ~210 bytes traced for an 8-byte block.
BLOCK_OVERHEAD = 200


class BlockCache:
    """An LRU map of CID to block bytes whose blocks cost at most ``max_bytes`` (``size``: what they cost)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._max_bytes = max_bytes
        self._blocks: OrderedDict[Cid, bytes] = OrderedDict()
        self.size = 0

    def get(self, cid: Cid) -> bytes | None:
        """The block, or None (a hit makes it the most recently used)."""
        data = self._blocks.get(cid)
        if data is not None:
            self._blocks.move_to_end(cid)
        return data

    def put(self, cid: Cid, data: bytes) -> None:
        """Keep a block (already verified against its CID), evicting the least recently used."""
        if cid in self._blocks or len(data) > self._max_bytes // 16:
            return
        self._blocks[cid] = data
        self.size += len(data) + BLOCK_OVERHEAD
        while self.size > self._max_bytes:
            _, evicted = self._blocks.popitem(last=False)
            self.size -= len(evicted) + BLOCK_OVERHEAD
