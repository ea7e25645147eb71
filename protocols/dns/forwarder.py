"""The resolution core shared by the guest-facing service and the in-process Resolver.

Owns: turning a cache miss into a guest-ready CacheEntry — one upstream query per key however many
guests ask at once (stampede protection), DNSSEC validation through the seam in
`protocols.dns.dnssec` (between the upstream pool and the cache), RRSIG/NSEC stripping for DO=0
guests, TTL caps, negative caching (RFC 2308), the bad cache for bogus answers, and `fetch`, the
DO+CD lookup the validator uses for DNSKEY/DS records.
Must not: decide policy, touch guest sockets, or return data the validator called bogus.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from policy.addresses import internal_class, internal_packed
from protocols.dns import wire
from protocols.dns.cache import Cache, CacheEntry, make_entry
from protocols.dns.dnssec.scrub import scrub
from protocols.dns.settings import DNSSettings
from protocols.dns.upstream import PoolFailure, UpstreamAnswer, UpstreamFailure, UpstreamPool

_DNSSEC_TYPES = frozenset({dns.rdatatype.RRSIG, dns.rdatatype.NSEC, dns.rdatatype.NSEC3})

# Rebinding protection: answers pointing at internal addresses (the one table: policy.addresses).
def is_private_packed(b: bytes) -> bool:
    """Whether a packed A (4 bytes) or AAAA (16 bytes) answer points at an internal address."""
    return internal_packed(b) is not None


def is_private_ip(text: str) -> bool:
    return internal_class(text) is not None


class NoValidator(Exception):
    """`dnssec: validate` is configured but the validator is not installed: fail closed."""


def load_validator(settings: DNSSettings, fetch: Callable[..., Any], log: logging.Logger) -> Any:
    """The DNSSEC validator (None when dnssec is off). Imported lazily: it lives in its own
    package, `protocols.dns.dnssec`, with `make_validator(settings, fetch)`."""
    if not settings.validate:
        return None
    try:
        from protocols.dns.dnssec import make_validator  # type: ignore[attr-defined]
    except ImportError as e:
        log.error("dnssec: validate is configured but the validator is unavailable (%s): "
                  "every answer will be SERVFAIL until it is installed", e)
        return NoValidator()
    return make_validator(settings, fetch)


class Resolution(Exception):
    """Raised by `Forwarder.resolve` when no answer can be produced (carries the EDE)."""

    def __init__(self, ede: int, text: str, *, alarm: str = "", upstream: dict[str, Any] | None = None):
        super().__init__(text)
        self.ede = ede
        self.text = text
        self.alarm = alarm
        self.upstream = upstream


class Forwarder:
    def __init__(
        self, settings: DNSSettings, log: logging.Logger, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.log = log
        self.clock = clock
        self.cache = Cache(settings.cache.size, settings.cache.serve_stale, settings.cache.max_bytes)
        self.pool = UpstreamPool(settings, log)
        self.flights: dict[bytes, asyncio.Future[CacheEntry]] = {}
        self._fetch_cache: OrderedDict[tuple[bytes, int], tuple[float, dns.message.Message]] = OrderedDict()
        self._fetch_flights: dict[tuple[bytes, int], asyncio.Task[dns.message.Message]] = {}
        self.validator = load_validator(settings, self.fetch, log)
        self.upstream_queries = 0
        self.coalesced = 0

    # -- misses --------------------------------------------------------------------------------
    async def resolve(self, key: bytes, qname: str, qtype: str) -> CacheEntry:
        """The entry for `key` from upstream (caller already missed the cache). Concurrent
        callers with the same key share one upstream query: the first does the work, the others
        wait on its future (no extra task per miss). Raises Resolution."""
        flight = self.flights.get(key)
        if flight is not None:
            self.coalesced += 1
            return await asyncio.shield(flight)
        flight = asyncio.get_running_loop().create_future()
        self.flights[key] = flight
        try:
            entry = await self._miss(key, qname, qtype)
        except asyncio.CancelledError:
            flight.cancel()
            raise
        except BaseException as e:
            flight.set_exception(e)
            flight.exception()  # retrieved here; waiters re-raise it
            raise
        else:
            flight.set_result(entry)
            return entry
        finally:
            if self.flights.get(key) is flight:
                del self.flights[key]

    async def _miss(self, key: bytes, qname: str, qtype: str) -> CacheEntry:
        s = self.settings
        question, bits = key[:-1], key[-1]
        g_edns, g_do, g_cd = bool(bits & wire.KEY_EDNS), bool(bits & wire.KEY_DO), bool(bits & wire.KEY_CD)
        validate = self.validator is not None and not g_cd
        loop = asyncio.get_running_loop()
        self.upstream_queries += 1
        try:
            ans = await self.pool.query(
                question, cd=s.validate or g_cd, do=s.validate or g_do, deadline=loop.time() + s.timeouts.query
            )
        except PoolFailure as e:
            raise Resolution(e.ede, str(e), alarm=e.alarm) from None
        if not validate and (g_do or not s.validate):
            # Nothing to validate or strip: shape the answer from bytes (no dnspython parse).
            entry = self._entry_raw(key, qname, qtype, ans, g_edns=g_edns, g_do=g_do)
            if entry is not None:
                return entry
        try:
            msg = dns.message.from_wire(ans.wire, ignore_trailing=True)
        except Exception as e:  # noqa: BLE001 - any parse failure of upstream data
            raise Resolution(wire.EDE_NETWORK_ERROR, f"malformed answer from upstream: {e}",
                             upstream=ans.audit()) from None
        status: str | None = None
        vttl: int | None = None
        if validate:
            if isinstance(self.validator, NoValidator):
                return self._servfail(key, qname, qtype, ans, "indeterminate", wire.EDE_OTHER,
                                      "DNSSEC validator not installed", 0)
            qn = msg.question[0].name if msg.question else dns.name.from_wire(question, 0)[0]
            try:
                res = await self.validator.validate(qn, struct.unpack_from("!H", question, len(question) - 4)[0], msg)
            except Exception as e:  # noqa: BLE001 - a validator crash must fail closed, not open
                self.log.exception("dnssec validator failed for %s %s", qname, qtype)
                return self._servfail(key, qname, qtype, ans, "indeterminate", wire.EDE_DNSSEC_BOGUS,
                                      f"validator error: {e}", 0)
            status = res.status
            if status in ("bogus", "indeterminate"):
                ede = res.ede if res.ede is not None else wire.EDE_DNSSEC_BOGUS
                # bogus: the bad cache (the validator's lifetime or ours); indeterminate means a
                # fetch failed, which is worth retrying on the next query.
                life = (res.ttl if res.ttl is not None else self.settings.cache.bogus_ttl) if status == "bogus" else 0
                return self._servfail(key, qname, qtype, ans, status, ede, res.reason, life)
            vttl = res.ttl
            if status == "secure":
                # AD=1 covers only what the validator checked: drop RRsets an upstream added
                # beside the validated chain and denial proof (they would ride along unvalidated).
                rdtype = struct.unpack_from("!H", question, len(question) - 4)[0]
                kept = scrub(qn, rdtype, msg)
                if len(kept.answer) != len(msg.answer) or len(kept.authority) != len(msg.authority):
                    return self._entry(key, qname, qtype, kept, ans, g_edns=g_edns, g_do=g_do, status=status,
                                       vttl=vttl)
        entry = self._entry_raw(key, qname, qtype, ans, g_edns=g_edns, g_do=g_do, strip=(s.validate or g_do) and not g_do,
                                status=status, vttl=vttl)
        if entry is not None:
            return entry
        return self._entry(key, qname, qtype, msg, ans, g_edns=g_edns, g_do=g_do, status=status, vttl=vttl)

    def _servfail(
        self, key: bytes, qname: str, qtype: str, ans: UpstreamAnswer, status: str, ede: int, reason: str,
        lifetime: int,
    ) -> CacheEntry:
        """A SERVFAIL entry for data that failed validation, cached for `lifetime` (the bad cache)."""
        bits = key[-1]
        head = struct.pack("!HBBHHHH", 0, wire.QR, wire.RA | wire.SERVFAIL, 1, 0, 0,
                           1 if bits & wire.KEY_EDNS else 0)
        w = head + key[:-1]
        if bits & wire.KEY_EDNS:
            w += wire.opt_rr(self.settings.edns_udp_size, bool(bits & wire.KEY_DO),
                             wire.ede_option(ede, reason[:200]))
        entry = make_entry(w, (), (), stored=self.clock(), lifetime=lifetime, rcode=wire.SERVFAIL, qname=qname,
                           qtype=qtype, status=status, ede=ede, upstream=ans.key(), reason=reason)
        if lifetime > 0:
            self.cache.put(key, entry)
        return entry

    def _entry(
        self, key: bytes, qname: str, qtype: str, msg: dns.message.Message, ans: UpstreamAnswer, *,
        g_edns: bool, g_do: bool, status: str | None, vttl: int | None,
    ) -> CacheEntry:
        cs = self.settings.cache
        rdtype = struct.unpack_from("!H", key, len(key) - 5)[0]
        rcode = msg.rcode()
        r = dns.message.Message(id=0)
        r.flags = dns.flags.QR | dns.flags.RA
        r.set_rcode(rcode)
        r.question = list(msg.question)

        def keep(rrset: Any, section: str) -> bool:
            if g_do or rrset.rdtype not in _DNSSEC_TYPES:
                return True
            return section == "answer" and rrset.rdtype == rdtype  # asked for explicitly

        r.answer = [x for x in msg.answer if keep(x, "answer")]
        r.authority = [x for x in msg.authority if keep(x, "authority")]
        r.additional = [x for x in msg.additional if keep(x, "additional")]
        if g_edns:
            r.use_edns(0, dns.flags.DO if g_do else 0, self.settings.edns_udp_size)
        lifetime = 0
        if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            if rcode == dns.rcode.NOERROR and r.answer:
                lifetime = min(x.ttl for x in r.answer)
                lifetime = max(cs.min_ttl, min(cs.max_ttl, lifetime))
            else:
                soa = next((x for x in r.authority if x.rdtype == dns.rdatatype.SOA), None)
                if soa is not None:  # RFC 2308 §5: no SOA, no negative caching
                    lifetime = min(soa.ttl, soa[0].minimum, cs.negative_max_ttl)
                    soa.ttl = lifetime
            if vttl is not None:
                lifetime = min(lifetime, vttl)
        for section in (r.answer, r.authority, r.additional):
            for x in section:
                x.ttl = max(cs.min_ttl, min(x.ttl, cs.max_ttl, lifetime if lifetime else x.ttl))
        w = r.to_wire(max_size=65535)
        offsets, _ = wire.scan(w)
        ttls = tuple(struct.unpack_from("!I", w, o)[0] for o in offsets)
        ips = tuple(
            rd.address for x in r.answer if x.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rd in x
        )
        private = tuple(ip for ip in ips if is_private_ip(ip))
        entry = make_entry(
            w, tuple(offsets), ttls, stored=self.clock(), lifetime=lifetime, rcode=rcode, qname=qname,
            qtype=qtype, status=status, answer_ips=ips, private_ips=private, upstream=ans.key(),
        )
        if lifetime > 0:
            self.cache.put(key, entry)
        return entry

    def _entry_raw(
        self, key: bytes, qname: str, qtype: str, ans: UpstreamAnswer, *, g_edns: bool, g_do: bool,
        strip: bool = False, status: str | None = None, vttl: int | None = None,
    ) -> CacheEntry | None:
        """The guest answer built straight from the upstream's bytes: header flags reset (never
        the upstream's AD/AA), its OPT removed and ours added, TTLs capped, lifetime per RFC 2308,
        and with `strip` the RRSIG/NSEC/NSEC3 records a DO=0 guest must not see removed.
        None when the message is unusual (then the dnspython path handles it)."""
        cs = self.settings.cache
        w = ans.wire
        try:
            recs = wire.walk(w)
        except (wire.FormErr, wire.Malformed):
            return None
        opts = [r for r in recs if r.rtype == wire.OPT]
        if opts:
            opt = opts[0]
            if len(opts) > 1 or opt is not recs[-1] or w[opt.ttl_at] != 0:
                return None  # several OPTs, OPT not last, or an extended rcode: the slow path
            recs.pop()
        qend = recs[0].start if recs else (opts[0].start if opts else len(w))  # end of the question
        cuts: list[tuple[int, int]] = []  # (start, end) of records removed for a DO=0 guest
        if strip:
            asked = struct.unpack_from("!H", key, len(key) - 5)[0]
            kept = [r for r in recs if r.rtype not in _DNSSEC_TYPES or (r.section == 1 and r.rtype == asked)]
            cuts = [(r.start, r.rdata_at + r.rdlen) for r in recs if r.rtype in _DNSSEC_TYPES and r not in kept]
            recs = kept
        rcode = w[3] & 0x0F
        counts = [0, 0, 0, 0]
        out = bytearray(w[:qend])
        ttl_at: list[int] = []
        for r in recs:
            counts[r.section] += 1
            ttl_at.append(len(out) + (r.ttl_at - r.start))
            out += w[r.start : r.rdata_at + r.rdlen]
        if cuts:
            # Names in kept records may point past a removed record: move those pointers back by
            # the bytes removed before their target; a pointer into removed bytes means give up.
            def moved(off: int) -> int | None:
                gone = 0
                for a, b in cuts:
                    if a <= off < b:
                        return None
                    if b <= off:
                        gone += b - a
                return off - gone

            try:
                for r in recs:
                    for pos, target in wire.record_pointers(w, r):
                        new_target, new_pos = moved(target), moved(pos)
                        if new_target is None or new_pos is None or target >= pos:
                            return None
                        struct.pack_into("!H", out, new_pos, 0xC000 | new_target)
            except (IndexError, wire.FormErr):
                return None
        struct.pack_into("!HBBHHHH", out, 0, 0, wire.QR, wire.RA | rcode, 1, counts[1], counts[2],
                         counts[3] + (1 if g_edns else 0))
        lifetime = 0
        answers = [r for r in recs if r.section == 1]
        if rcode in (wire.NOERROR, wire.NXDOMAIN):
            if rcode == wire.NOERROR and answers:
                lifetime = min(struct.unpack_from("!I", w, r.ttl_at)[0] for r in answers)
                lifetime = max(cs.min_ttl, min(cs.max_ttl, lifetime))
            else:
                soa = next((r for r in recs if r.section == 2 and r.rtype == 6), None)
                if soa is not None and soa.rdlen >= 22:
                    minimum = struct.unpack_from("!I", w, soa.rdata_at + soa.rdlen - 4)[0]
                    soa_ttl = struct.unpack_from("!I", w, soa.ttl_at)[0]
                    lifetime = min(soa_ttl, minimum, cs.negative_max_ttl)
            if vttl is not None:
                lifetime = min(lifetime, vttl)
        ttls, ips, private = [], [], []
        for r, at in zip(recs, ttl_at, strict=True):
            ttl = struct.unpack_from("!I", w, r.ttl_at)[0]
            ttl = max(cs.min_ttl, min(ttl, cs.max_ttl, lifetime if lifetime else ttl))
            struct.pack_into("!I", out, at, ttl)
            ttls.append(ttl)
            if r.section == 1 and r.rtype in (1, 28) and r.rdlen in (4, 16):
                packed = w[r.rdata_at : r.rdata_at + r.rdlen]
                text = socket.inet_ntop(socket.AF_INET if r.rdlen == 4 else socket.AF_INET6, packed)
                ips.append(text)
                if is_private_packed(packed):
                    private.append(text)
        if g_edns:
            out += wire.opt_rr(self.settings.edns_udp_size, g_do)
        entry = make_entry(
            bytes(out), tuple(ttl_at), tuple(ttls), stored=self.clock(), lifetime=lifetime, rcode=rcode,
            qname=qname, qtype=qtype, status=status, answer_ips=tuple(ips), private_ips=tuple(private),
            upstream=ans.key(),
        )
        if lifetime > 0:
            self.cache.put(key, entry)
        return entry

    # -- the validator's lookups ---------------------------------------------------------------
    async def fetch(self, qname: dns.name.Name, rdtype: int) -> dns.message.Message:
        """A DO+CD lookup through the DoT pool, cached by TTL: what the validator uses to walk
        DNSKEY and DS records. Raises PoolFailure when no upstream answers."""
        wname = qname.canonicalize().to_wire()
        fkey = (wname, int(rdtype))
        now = self.clock()
        hit = self._fetch_cache.get(fkey)
        if hit is not None and hit[0] > now:
            return hit[1]
        task = self._fetch_flights.get(fkey)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(wname, int(rdtype)))
            self._fetch_flights[fkey] = task
            task.add_done_callback(lambda t, k=fkey: self._fetch_flights.pop(k, None))
        return await asyncio.shield(task)

    async def _fetch(self, wname: bytes, rdtype: int) -> dns.message.Message:
        loop = asyncio.get_running_loop()
        question = wname + struct.pack("!HH", rdtype, dns.rdataclass.IN)
        ans = await self.pool.query(question, cd=True, do=True, deadline=loop.time() + self.settings.timeouts.query)
        msg = dns.message.from_wire(ans.wire, ignore_trailing=True)
        ttls = [x.ttl for x in msg.answer] or [
            min(x.ttl, x[0].minimum) for x in msg.authority if x.rdtype == dns.rdatatype.SOA
        ]
        ttl = min([*ttls, self.settings.cache.max_ttl]) if ttls else 0
        if ttl > 0 and msg.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            self._fetch_cache[(wname, rdtype)] = (self.clock() + ttl, msg)
            while len(self._fetch_cache) > 10_000:
                self._fetch_cache.popitem(last=False)
        return msg

    def stale(self, key: bytes) -> CacheEntry | None:
        return self.cache.get_stale(key, self.clock()) if self.settings.cache.serve_stale else None

    def health(self) -> dict[str, Any]:
        return {
            "upstreams": self.pool.health(),
            "cache_entries": len(self.cache),
            "cache_bytes": self.cache.bytes,
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            "cache_evictions": self.cache.evictions,
            "upstream_queries": self.upstream_queries,
            "coalesced": self.coalesced,
            "dnssec": "off" if self.validator is None else
            ("unavailable" if isinstance(self.validator, NoValidator) else "validate"),
        }

    async def close(self) -> None:
        for f in self.flights.values():
            f.cancel()
        tasks = list(self._fetch_flights.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.pool.close()


__all__ = ["Forwarder", "Resolution", "UpstreamFailure", "is_private_ip"]
