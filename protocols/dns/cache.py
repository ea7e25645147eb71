"""The answer cache: bounded, bytes in, bytes out.

Owns: the cache entry (a plain tuple, layout in `E`: a guest-ready answer template with ID 0, the
offsets of its TTL fields, the validation status it was stored with, and what the policy needs to
re-check on a hit) and `Cache` (LRU bounded by entries and bytes, TTLs counted down, optional
serve-stale per RFC 8767).
Must not: parse messages with dnspython or talk to upstreams; keys are the raw lower-cased question
bytes plus the EDNS/DO/CD variant bits (see `wire.parse_query`), so a hit costs a dict lookup and a
few byte patches.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any

_TTL = struct.Struct("!I")


class E:
    """Field positions in a cache entry. An entry is a plain tuple of bytes, numbers, strings and
    tuples of those: CPython's collector stops tracking such tuples after it first sees them, so a
    full cache adds nothing to garbage-collection pauses (FIELD-NOTES: a cache of objects caused
    250-490 ms stalls; 100k slot objects still cost ~30 ms per full collection here)."""

    WIRE = 0  # the guest-ready answer, ID 0, TTLs as stored
    OFFSETS = 1  # offsets of the TTL fields in WIRE
    TTLS = 2  # the TTL values as stored
    STORED = 3  # clock time stored
    EXPIRES = 4
    RCODE = 5
    QNAME = 6  # presentation text, lower case (policy and audit)
    QTYPE = 7
    STATUS = 8  # DNSSEC: "secure" | "insecure" | "bogus" | "indeterminate" | None (not validated)
    EDE = 9
    IPS = 10  # every A/AAAA address in the answer (for answer_ip rules)
    PRIVATE = 11  # those in internal ranges (policy.addresses; rebinding protection)
    UPSTREAM = 12  # (address, name, tls version, resumed) of the upstream that answered
    REASON = 13  # why a SERVFAIL entry failed validation


CacheEntry = tuple  # see E for the layout


def make_entry(
    wire: bytes,
    ttl_offsets: Any,
    ttls: Any,
    *,
    stored: float,
    lifetime: float,
    rcode: int,
    qname: str,
    qtype: str,
    status: str | None = None,
    ede: int | None = None,
    answer_ips: Any = (),
    private_ips: Any = (),
    upstream: tuple[str, str, str, bool] | None = None,
    reason: str = "",
) -> CacheEntry:
    return (bytes(wire), tuple(ttl_offsets), tuple(ttls), stored, stored + lifetime, rcode, qname, qtype, status,
            ede, tuple(answer_ips), tuple(private_ips), upstream, reason)


def wire_at(e: CacheEntry, now: float) -> bytearray:
    """The answer with TTLs decremented by the whole seconds it has been cached (a fresh copy the
    caller may patch further)."""
    buf = bytearray(e[0])
    age = int(now - e[3])
    if age > 0:
        for off, ttl in zip(e[1], e[2], strict=True):
            _TTL.pack_into(buf, off, ttl - age if ttl > age else 0)
    return buf


def stale_wire(e: CacheEntry, ttl: int) -> bytearray:
    """The answer as served stale (RFC 8767 §4): every TTL set to `ttl`."""
    buf = bytearray(e[0])
    for off in e[1]:
        _TTL.pack_into(buf, off, ttl)
    return buf


def upstream_audit(u: tuple[str, str, str, bool] | None) -> dict[str, Any] | None:
    """The audit record's `upstream` object for an entry's upstream tuple."""
    if u is None:
        return None
    return {"address": u[0], "name": u[1], "tls": u[2], "verified": True, "resumed": u[3]}


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
        self.bytes -= len(e[0]) + len(key)

    def get(self, key: bytes, now: float) -> CacheEntry | None:
        e = self._d.get(key)
        if e is None:
            self.misses += 1
            return None
        if now >= e[4]:
            if now >= e[4] + self.serve_stale:
                self._drop(key)
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return e

    def get_stale(self, key: bytes, now: float) -> CacheEntry | None:
        e = self._d.get(key)
        if e is None or now >= e[4] + self.serve_stale:
            return None
        return e

    def put(self, key: bytes, entry: CacheEntry) -> None:
        if self.size <= 0:
            return
        if key in self._d:
            self._drop(key)
        self._d[key] = entry
        self.bytes += len(entry[0]) + len(key)
        while len(self._d) > self.size or (self.bytes > self.max_bytes and len(self._d) > 1):
            old, e = self._d.popitem(last=False)
            self.bytes -= len(e[0]) + len(old)
            self.evictions += 1

    def clear(self) -> None:
        self._d.clear()
        self.bytes = 0
