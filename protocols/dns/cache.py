"""The answer cache: bounded, bytes in, bytes out.

Owns: `CacheEntry` (a guest-ready answer template with ID 0, the offsets of its TTL fields, the
validation status it was stored with, and what the policy needs to re-check on a hit) and `Cache`
(LRU bounded by entries, TTLs counted down, optional serve-stale per RFC 8767).
Must not: parse messages with dnspython or talk to upstreams; keys are the raw lower-cased question
bytes plus the EDNS/DO/CD variant bits (see `wire.parse_query`), so a hit costs a dict lookup and a
few byte patches.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any

_TTL = struct.Struct("!I")


class CacheEntry:
    """A stored answer. Mutable only in its per-second memo of the TTL-patched bytes."""

    __slots__ = (
        "wire", "ttl_offsets", "ttls", "stored", "expires", "rcode", "status", "ede",
        "qname", "qtype", "answer_ips", "private_ips", "upstream", "reason", "_memo_age", "_memo",
    )

    def __init__(
        self,
        wire: bytes,
        ttl_offsets: tuple[int, ...],
        ttls: tuple[int, ...],
        *,
        stored: float,
        lifetime: float,
        rcode: int,
        qname: str,
        qtype: str,
        status: str | None = None,
        ede: int | None = None,
        answer_ips: tuple[str, ...] = (),
        private_ips: tuple[str, ...] = (),
        upstream: dict[str, Any] | None = None,
    ) -> None:
        self.wire = wire
        self.ttl_offsets = ttl_offsets
        self.ttls = ttls
        self.stored = stored
        self.expires = stored + lifetime
        self.rcode = rcode
        self.status = status  # DNSSEC: "secure" | "insecure" | "bogus" | "indeterminate" | None
        self.ede = ede
        self.qname = qname
        self.qtype = qtype
        self.answer_ips = answer_ips  # every A/AAAA address in the answer (for answer_ip rules)
        self.private_ips = private_ips  # those in private/loopback/link-local/unspecified ranges
        self.upstream = upstream
        self.reason = ""  # why a SERVFAIL entry failed validation (for the audit record)
        self._memo_age = -1
        self._memo = wire

    def wire_at(self, now: float) -> bytes:
        """The answer with TTLs decremented by the whole seconds it has been cached."""
        age = int(now - self.stored)
        if age == self._memo_age:
            return self._memo
        buf = bytearray(self.wire)
        for off, ttl in zip(self.ttl_offsets, self.ttls, strict=True):
            _TTL.pack_into(buf, off, ttl - age if ttl > age else 0)
        self._memo = bytes(buf)
        self._memo_age = age
        return self._memo

    def stale_wire(self, ttl: int) -> bytes:
        """The answer as served stale (RFC 8767 §4): every TTL set to `ttl`."""
        buf = bytearray(self.wire)
        for off in self.ttl_offsets:
            _TTL.pack_into(buf, off, ttl)
        return bytes(buf)


class Cache:
    """LRU cache of CacheEntry by key, bounded by entries and by bytes of stored answers. `get`
    returns only fresh entries; `get_stale` also those expired less than `serve_stale` seconds ago."""

    def __init__(self, size: int, serve_stale: float = 0.0, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.serve_stale = serve_stale
        self._d: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._d)

    def _drop(self, key: bytes) -> None:
        e = self._d.pop(key)
        self.bytes -= len(e.wire) + len(key)

    def get(self, key: bytes, now: float) -> CacheEntry | None:
        e = self._d.get(key)
        if e is None:
            self.misses += 1
            return None
        if now >= e.expires:
            if now >= e.expires + self.serve_stale:
                self._drop(key)
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return e

    def get_stale(self, key: bytes, now: float) -> CacheEntry | None:
        e = self._d.get(key)
        if e is None or now >= e.expires + self.serve_stale:
            return None
        return e

    def put(self, key: bytes, entry: CacheEntry) -> None:
        if self.size <= 0:
            return
        if key in self._d:
            self._drop(key)
        self._d[key] = entry
        self.bytes += len(entry.wire) + len(key)
        while len(self._d) > self.size or (self.bytes > self.max_bytes and len(self._d) > 1):
            old, e = self._d.popitem(last=False)
            self.bytes -= len(e.wire) + len(old)
            self.evictions += 1

    def clear(self) -> None:
        self._d.clear()
        self.bytes = 0
