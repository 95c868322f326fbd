"""Blocks of accounts' repos kept between the jobs of one account (content-addressed, so never stale).

Verified mode walks each of an account's collections in its own job; the MST nodes near the root, the
probe's proof path and, for small repos fetched whole, every block, serve the account's next collections
without another request. Bounded by bytes, least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict

from daemon.atproto.cid import Cid

DEFAULT_CACHE_BYTES = 16 * 1024 * 1024


class BlockCache:
    """An LRU map of CID to block bytes, holding at most ``max_bytes`` of blocks."""

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
        self.size += len(data)
        while self.size > self._max_bytes:
            _, evicted = self._blocks.popitem(last=False)
            self.size -= len(evicted)
