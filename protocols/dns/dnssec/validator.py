"""The chain-of-trust walk and the verdict on one upstream answer.

Owns: `Validator` — given the question and the DO+CD answer from upstream, it walks from the closest
trust anchor down the delegation path (DS then DNSKEY per zone cut, fetched through the injected
`fetch`), verifies every RRset of the answer chain (CNAME/DNAME link by link, each in its own zone),
checks wildcard expansions and NSEC/NSEC3 denials, and returns a `ValidationResult`. It caches zone
keys and zone-cut facts with TTLs capped by RRSIG expiry, and bogus verdicts for a short while (bad
cache) so a broken zone cannot make us hammer upstream.
Must not: open sockets, read the wall clock except through the injected `clock`/`now`, alter the
response, or decide what the guest sees (AD bit, SERVFAIL, EDE option) — the DNS service does.

Zone discovery: for signed data the RRSIG signer names the zone, and we walk only down to it; for
unsigned data we walk label by label to the owner name, asking DS at each label: a validated DS
makes a secure cut, a validated NSEC/NSEC3 "delegation without DS" (or opt-out) makes the rest
insecure, anything else keeps us inside the current secure zone — which is the fail-closed direction
(data there must then carry that zone's signatures).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from . import crypto
from .anchors import TrustAnchor
from .denial import Denial, DenialOutcome, NSEC3Proof, NSECProof
from .result import (
    EDE,
    Status,
    ValidationResult,
    bogus,
    indeterminate,
    insecure,
    secure,
)

Fetch = Callable[[dns.name.Name, int], Awaitable[dns.message.Message]]

IN = dns.rdataclass.IN
RRSIG, DS, DNSKEY, CNAME, DNAME, SOA, NSEC, NSEC3 = (
    dns.rdatatype.RRSIG, dns.rdatatype.DS, dns.rdatatype.DNSKEY, dns.rdatatype.CNAME,
    dns.rdatatype.DNAME, dns.rdatatype.SOA, dns.rdatatype.NSEC, dns.rdatatype.NSEC3,
)
MAX_CHAIN = 12  # CNAME/DNAME links followed in one answer
# Zone cuts probed (DS fetches) by one walk: the walk for unsigned data goes label by label, and a guest
# chooses how many labels a name has; real delegation paths are far shorter.
MAX_WALK_CUTS = 16
# A signature by a key we do not hold may mean the zone rolled its keys since we cached them: refetch
# the DNSKEY RRset, at most once per zone per this many seconds (so forged key tags cannot hammer it).
KEY_REFRESH_AFTER = 5.0
_FOREVER = 2**31


class _Indeterminate(Exception):
    """Fetching a DS/DNSKEY failed: no verdict possible now."""


@dataclass(frozen=True, slots=True)
class ZoneKeys:
    """What the walk knows about the zone enclosing a name."""

    zone: dns.name.Name
    status: Status
    keys: crypto.KeySet | None = None
    expires: float = 0.0
    reason: str = ""
    ede: int | None = None
    fetched: float = 0.0


@dataclass(frozen=True, slots=True)
class _Walk:
    zk: ZoneKeys
    expires: float


class CutKind(StrEnum):
    SECURE = "secure"  # validated DS: a secure delegation
    NONE = "none"  # not (provably) a cut: stay in the parent zone
    INSECURE = "insecure"  # proven delegation without usable DS
    NXDOMAIN = "nxdomain"  # the name does not exist: nothing below it either
    BOGUS = "bogus"


@dataclass(frozen=True, slots=True)
class Cut:
    kind: CutKind
    expires: float
    ds: tuple[Any, ...] = ()
    reason: str = ""
    ede: int | None = None


@dataclass(slots=True)
class _Acc:
    """Accumulates the TTL cap over every signature that verified for one answer."""

    ttl: int = _FOREVER
    links: list[str] = field(default_factory=list)

    def add(self, verified: crypto.Verified, now: float) -> None:
        self.ttl = min(self.ttl, int(verified.rrsig.original_ttl), max(0, int(verified.expires - now)))


class _TTLCache:
    """A bounded mapping whose entries carry their own expiry (seconds since the epoch)."""

    def __init__(self, size: int) -> None:
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._size = size

    def get(self, key: Any, now: float) -> Any:
        v = self._d.get(key)
        if v is None:
            return None
        if v.expires <= now:
            del self._d[key]
            return None
        return v

    def put(self, key: Any, value: Any) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self._size:
            self._d.popitem(last=False)

    def drop(self, key: Any) -> None:
        self._d.pop(key, None)

    def __len__(self) -> int:
        return len(self._d)


@dataclass(frozen=True, slots=True)
class _Bad:
    result: ValidationResult
    expires: float


class _RRsetName:
    """"owner TYPE", formatted only when a failure message needs it (to_text is not free)."""

    __slots__ = ("rrset",)

    def __init__(self, rrset: dns.rrset.RRset) -> None:
        self.rrset = rrset

    def __format__(self, spec: str) -> str:
        return f"{self.rrset.name} {dns.rdatatype.to_text(self.rrset.rdtype)}"


def _find(section: list[dns.rrset.RRset], name: dns.name.Name, rdtype: int, covers: int = 0):
    for r in section:
        if r.rdtype == rdtype and r.covers == covers and r.name == name and r.rdclass == IN:
            return r
    return None


def _neg_ttl(msg: dns.message.Message, default: int = 60) -> int:
    for r in msg.authority:
        if r.rdtype == SOA and len(r):
            return min(r.ttl, r[0].minimum)
    return default


class Validator:
    """A stub validator over an injected fetch. One instance per DNS service; safe to share between
    concurrent tasks of one event loop (identical concurrent key fetches are made once)."""

    def __init__(
        self,
        anchors: dict[dns.name.Name, TrustAnchor],
        fetch: Fetch,
        *,
        clock: Callable[[], float] = time.time,
        bogus_ttl: int = 60,
        max_key_ttl: int = 86400,
        cache_size: int = 20000,
    ) -> None:
        self.anchors = dict(anchors)
        self._fetch = fetch
        self._clock = clock
        self.bogus_ttl = bogus_ttl
        self.max_key_ttl = max_key_ttl
        self._zones = _TTLCache(cache_size)
        self._cuts = _TTLCache(cache_size)
        self._bad = _TTLCache(cache_size)
        self._walks = _TTLCache(cache_size)  # name -> where the walk to it ends (memo of _walk)
        self._inflight: dict[Any, asyncio.Future] = {}
        self._keycache = crypto.KeyCache()
        self.fetches = 0  # DS/DNSKEY queries sent (for tests and metrics)

    # ------------------------------------------------------------------ public API

    async def validate(
        self, qname: dns.name.Name, rdtype: int, response: dns.message.Message, *, now: float | None = None
    ) -> ValidationResult:
        """Validate `response` (an answer to qname/rdtype fetched with DO=1, CD=1)."""
        now = self._clock() if now is None else now
        cached = self.cached_bogus(qname, rdtype, now=now)
        if cached is not None:
            return cached
        try:
            result = await self._validate(qname, rdtype, response, now)
        except _Indeterminate as exc:
            return indeterminate(str(exc))
        except (dns.exception.DNSException, ValueError, TypeError, AttributeError, IndexError) as exc:
            # Malformed records from upstream (or a validator bug): never raise into the service,
            # never call it secure. Fail closed.
            result = bogus(f"unprocessable answer: {type(exc).__name__}: {exc}")
        if result.status == Status.BOGUS:
            result = ValidationResult(result.status, result.ede, result.reason, self.bogus_ttl)
            self._bad.put((qname, rdtype), _Bad(result, now + self.bogus_ttl))
        return result

    def cached_bogus(self, qname: dns.name.Name, rdtype: int, *, now: float | None = None) -> ValidationResult | None:
        """The bad-cache entry for this question, if one is live: the service can answer SERVFAIL
        without asking upstream again."""
        bad = self._bad.get((qname, rdtype), self._clock() if now is None else now)
        return bad.result if bad is not None else None

    def stats(self) -> dict[str, int]:
        return {"zones": len(self._zones), "cuts": len(self._cuts), "bad": len(self._bad), "fetches": self.fetches}

    # ------------------------------------------------------------------ the answer chain

    async def _validate(self, qname, rdtype, msg, now) -> ValidationResult:
        rcode = msg.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return indeterminate(f"upstream answered {dns.rcode.to_text(rcode)}")
        acc = _Acc()
        sname = qname
        seen: set[dns.name.Name] = set()
        for _ in range(MAX_CHAIN):
            if sname in seen:
                return bogus(f"CNAME/DNAME loop at {sname}")
            seen.add(sname)
            rrset = _find(msg.answer, sname, rdtype)
            if rrset is not None:
                r = await self._positive(rrset, sname, msg, now, acc)
                return r if r is not None else self._secure(acc, "answer")
            # A DNAME above sname comes first: the CNAME the server synthesised from it is unsigned
            # (RFC 6672 §5.3.1) and is ignored; we derive the target ourselves.
            dname = next((r for r in msg.answer if r.rdtype == DNAME and sname.is_subdomain(r.name)
                          and sname != r.name), None)
            if dname is not None and rdtype != DNAME:
                r = await self._positive(dname, dname.name, msg, now, acc)
                if r is not None:
                    return r
                acc.links.append("DNAME")
                try:
                    sname = sname.relativize(dname.name).concatenate(dname[0].target)
                except dns.name.NameTooLong:
                    return bogus(f"DNAME substitution of {sname} is too long")
                continue
            if rdtype != CNAME:
                cname = _find(msg.answer, sname, CNAME)
                if cname is not None:
                    r = await self._positive(cname, sname, msg, now, acc)
                    if r is not None:
                        return r
                    acc.links.append("CNAME")
                    sname = cname[0].target
                    continue
            r = await self._negative(sname, rdtype, msg, rcode == dns.rcode.NXDOMAIN, now, acc)
            if r is not None:
                return r
            return self._secure(acc, "NXDOMAIN" if rcode == dns.rcode.NXDOMAIN else "NODATA")
        return bogus(f"answer chain longer than {MAX_CHAIN} links")

    def _secure(self, acc: _Acc, what: str) -> ValidationResult:
        via = f" ({'; '.join(acc.links)})" if acc.links else ""
        return secure(f"{what} validated{via}", None if acc.ttl == _FOREVER else acc.ttl)

    async def _signed_zone(self, signer: dns.name.Name, owner: dns.name.Name, now: float):
        """Keys for `signer`, or a final (non-secure) result."""
        zk = await self._zone_for(signer, now)
        if zk.status != Status.SECURE:
            return self._zone_result(zk, owner)
        if zk.zone != signer:
            return bogus(f"{owner} is signed by {signer}, which is not a zone in the chain of trust",
                         EDE.DNSKEY_MISSING)
        return zk

    def _zone_result(self, zk: ZoneKeys, owner: dns.name.Name) -> ValidationResult:
        if zk.status == Status.INSECURE:
            return insecure(zk.reason or f"{owner} is in the unsigned zone {zk.zone}", zk.ede)
        if zk.status == Status.BOGUS:
            return bogus(zk.reason, zk.ede or EDE.DNSSEC_BOGUS)
        return indeterminate(zk.reason)

    async def _positive(self, rrset, sname, msg, now, acc) -> ValidationResult | None:
        """Verify one answer RRset; None means it is secure (and `acc` was updated)."""
        tname = _RRsetName(rrset)
        sigs = _find(msg.answer, rrset.name, RRSIG, rrset.rdtype)
        signers = sorted({s.signer for s in sigs if rrset.name.is_subdomain(s.signer)}, key=len,
                         reverse=True) if sigs else []
        if rrset.rdtype == DS:
            signers = [s for s in signers if s != rrset.name]  # a DS is signed by the parent
        if not signers:
            zk = await self._zone_for(rrset.name, now)
            if zk.status != Status.SECURE:
                return self._zone_result(zk, rrset.name)
            return bogus(f"{tname} has no RRSIG but {zk.zone} is signed", EDE.RRSIGS_MISSING)
        signer = signers[0]
        zk = await self._signed_zone(signer, rrset.name, now)
        if isinstance(zk, ValidationResult):
            return zk
        v, zk = await self._verify(rrset, sigs, signer, zk, now)
        if isinstance(v, ValidationResult):
            return v
        if isinstance(v, crypto.VerifyFailure):
            return bogus(f"{tname}: {v.reason}", v.ede)
        acc.add(v, now)
        owner_labels = len(rrset.name) - 1 - (1 if rrset.name.is_wild() else 0)
        if v.rrsig.labels < owner_labels:
            if rrset.rdtype == DNAME:
                return bogus(f"{tname} comes from a wildcard")
            proof = self._verified_denial(msg, signer, zk, now, acc)
            if isinstance(proof, ValidationResult):
                return proof
            out = proof.wildcard(sname, v.rrsig.labels)
            return self._denial_result(out, acc)
        return None

    async def _negative(self, sname, rdtype, msg, nxdomain, now, acc) -> ValidationResult | None:
        signers = sorted(
            {
                s.signer
                for r in msg.authority
                if r.rdtype == RRSIG and r.covers in (SOA, NSEC, NSEC3)
                for s in r
                if sname.is_subdomain(s.signer)
            },
            key=len,
            reverse=True,
        )
        if not signers:
            what = f"{sname} (NXDOMAIN)" if nxdomain else f"{sname} {dns.rdatatype.to_text(rdtype)} (NODATA)"
            zk = await self._zone_for(sname, now)
            if zk.status != Status.SECURE:
                return self._zone_result(zk, sname)
            has_nsec = any(r.rdtype in (NSEC, NSEC3) for r in msg.authority)
            return bogus(f"{what} in signed zone {zk.zone} carries no signed denial",
                         EDE.RRSIGS_MISSING if has_nsec else EDE.NSEC_MISSING)
        signer = signers[0]
        zk = await self._signed_zone(signer, sname, now)
        if isinstance(zk, ValidationResult):
            return zk
        soa = _find(msg.authority, signer, SOA)
        if soa is not None:
            v, zk = await self._verify(soa, _find(msg.authority, signer, RRSIG, SOA), signer, zk, now)
            if isinstance(v, ValidationResult):
                return v
            if isinstance(v, crypto.VerifyFailure):
                return bogus(f"{signer} SOA: {v.reason}", v.ede)
            acc.add(v, now)
        proof = self._verified_denial(msg, signer, zk, now, acc)
        if isinstance(proof, ValidationResult):
            return proof
        out = proof.nxdomain(sname) if nxdomain else proof.nodata(sname, rdtype)
        return self._denial_result(out, acc)

    async def _verify(self, rrset, sigs, signer, zk: ZoneKeys, now: float):
        """verify_rrset, refetching the signer's keys once when the RRSIG names a key we do not hold
        (a key rollover since we cached them). Returns (Verified | VerifyFailure | final result, keys)."""
        v = crypto.verify_rrset(rrset, sigs, signer, zk.keys, now, self._keycache)
        if (isinstance(v, crypto.VerifyFailure) and v.ede == EDE.DNSKEY_MISSING
                and now - zk.fetched >= KEY_REFRESH_AFTER):
            self._zones.drop(signer)
            self._walks.drop(signer)
            fresh = await self._signed_zone(signer, rrset.name, now)
            if isinstance(fresh, ValidationResult):
                return fresh, zk
            zk = fresh
            v = crypto.verify_rrset(rrset, sigs, signer, zk.keys, now, self._keycache)
        return v, zk

    def _denial_result(self, out: DenialOutcome, acc: _Acc) -> ValidationResult | None:
        if out.status == Denial.SECURE:
            acc.links.append(out.reason)
            return None
        if out.status == Denial.INSECURE:
            return insecure(out.reason, out.ede)
        return bogus(out.reason, out.ede or EDE.NSEC_MISSING)

    def _verified_denial(self, msg, signer, zk: ZoneKeys, now, acc):
        """Verify every NSEC/NSEC3 RRset in the authority section signed by `signer`; build the proof."""
        nsec, nsec3 = [], []
        for r in msg.authority:
            if r.rdtype not in (NSEC, NSEC3) or not r.name.is_subdomain(signer):
                continue
            v = crypto.verify_rrset(r, _find(msg.authority, r.name, RRSIG, r.rdtype), signer, zk.keys, now,
                                    self._keycache)
            if isinstance(v, crypto.VerifyFailure):
                return bogus(f"{r.name} {dns.rdatatype.to_text(r.rdtype)}: {v.reason}", v.ede)
            acc.add(v, now)
            (nsec if r.rdtype == NSEC else nsec3).append(r)
        if nsec3:
            return NSEC3Proof(signer, nsec3)
        if nsec:
            return NSECProof(signer, nsec)
        return bogus(f"no NSEC or NSEC3 records from {signer}", EDE.NSEC_MISSING)

    # ------------------------------------------------------------------ the chain of trust

    def _closest_anchor(self, name: dns.name.Name) -> dns.name.Name | None:
        n = name
        while True:
            if n in self.anchors:
                return n
            if n == dns.name.root:
                return None
            n = n.parent()

    async def _zone_for(self, name: dns.name.Name, now: float) -> ZoneKeys:
        """The deepest zone at or above `name` the walk can establish: secure keys, or where it stops."""
        w = self._walks.get(name, now)
        if w is not None:
            return w.zk
        zk, expires = await self._walk(name, now)
        self._walks.put(name, _Walk(zk, expires))
        return zk

    async def _walk(self, name: dns.name.Name, now: float) -> tuple[ZoneKeys, float]:
        anchor = self._closest_anchor(name)
        if anchor is None:
            return ZoneKeys(dns.name.root, Status.INSECURE, reason=f"no trust anchor covers {name}"), \
                now + self.max_key_ttl
        zk = await self._keys(anchor, None, now)
        expires = zk.expires
        depth = len(anchor)
        probes = 0
        while zk.status == Status.SECURE and depth < len(name):
            depth += 1
            child = name.split(depth)[1]
            if child in self.anchors:
                zk = await self._keys(child, None, now)
                expires = min(expires, zk.expires)
                continue
            if self._cuts.get(child, now) is None:
                probes += 1
                if probes > MAX_WALK_CUTS:
                    raise _Indeterminate(f"{name}: more than {MAX_WALK_CUTS} zone cuts to probe below {zk.zone}")
            cut = await self._cut(child, zk, now)
            expires = min(expires, cut.expires)
            if cut.kind == CutKind.NONE:
                continue
            if cut.kind == CutKind.NXDOMAIN:
                break
            if cut.kind == CutKind.SECURE:
                zk = await self._keys(child, cut, now)
                expires = min(expires, zk.expires)
            elif cut.kind == CutKind.INSECURE:
                return ZoneKeys(child, Status.INSECURE, reason=cut.reason, ede=cut.ede, expires=cut.expires), expires
            else:
                return ZoneKeys(child, Status.BOGUS, reason=cut.reason, ede=cut.ede, expires=cut.expires), expires
        return zk, expires

    async def _once(self, key: Any, factory: Callable[[], Awaitable[Any]]) -> Any:
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            res = await factory()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: waiters (if any) get it, nobody else must
            raise
        finally:
            self._inflight.pop(key, None)
        fut.set_result(res)
        return res

    async def _query(self, name: dns.name.Name, rdtype: int) -> dns.message.Message:
        self.fetches += 1
        try:
            msg = await self._fetch(name, rdtype)
        except Exception as exc:  # the fetch seam may raise anything: it is a verdict of "no answer"
            raise _Indeterminate(f"fetching {name} {dns.rdatatype.to_text(rdtype)} failed: {exc}") from exc
        if msg.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise _Indeterminate(
                f"fetching {name} {dns.rdatatype.to_text(rdtype)}: upstream answered {dns.rcode.to_text(msg.rcode())}"
            )
        return msg

    async def _cut(self, child: dns.name.Name, parent: ZoneKeys, now: float) -> Cut:
        cut = self._cuts.get(child, now)
        if cut is not None:
            return cut
        cut = await self._once(("cut", child), lambda: self._fetch_cut(child, parent, now))
        self._cuts.put(child, cut)
        return cut

    async def _fetch_cut(self, child: dns.name.Name, parent: ZoneKeys, now: float) -> Cut:
        msg = await self._query(child, DS)
        neg_until = now + min(_neg_ttl(msg), self.max_key_ttl)
        if msg.rcode() == dns.rcode.NXDOMAIN:
            return Cut(CutKind.NXDOMAIN, neg_until)
        ds = _find(msg.answer, child, DS)
        if ds is not None:
            v = crypto.verify_rrset(ds, _find(msg.answer, child, RRSIG, DS), parent.zone, parent.keys, now,
                                    self._keycache)
            if isinstance(v, crypto.VerifyFailure):
                return Cut(CutKind.BOGUS, now + self.bogus_ttl, reason=f"{child} DS: {v.reason}", ede=v.ede)
            until = now + min(ds.ttl, v.rrsig.original_ttl, max(0, v.expires - now), self.max_key_ttl)
            if not crypto.usable_ds(ds):
                algs = {d.algorithm for d in ds}
                ede = (EDE.UNSUPPORTED_DNSKEY_ALGORITHM if not algs & crypto.SUPPORTED_ALGORITHMS
                       else EDE.UNSUPPORTED_DS_DIGEST_TYPE)
                return Cut(CutKind.INSECURE, until, reason=f"{child} DS uses only unsupported algorithms/digests"
                           f" ({', '.join(f'{d.algorithm}/{d.digest_type}' for d in ds)}): insecure (RFC 6840 §5.2)",
                           ede=ede)
            return Cut(CutKind.SECURE, until, ds=tuple(ds))
        if _find(msg.answer, child, CNAME) is not None:
            return Cut(CutKind.NONE, neg_until)
        # NODATA: does a verified denial from the parent say "delegation without DS"?
        acc = _Acc()
        proof = self._verified_denial(msg, parent.zone, parent, now, acc)
        if isinstance(proof, ValidationResult):
            return Cut(CutKind.NONE, now + min(60, self.bogus_ttl))  # unproven: stay in the parent (safe)
        out = proof.nodata(child, DS)
        if out.ok and out.delegation:
            return Cut(CutKind.INSECURE, min(neg_until, now + acc.ttl),
                       reason=f"{child} is an unsigned delegation from {parent.zone} ({out.reason})", ede=out.ede)
        if out.status == Denial.INSECURE and out.ede == EDE.UNSUPPORTED_NSEC3_ITERATIONS:
            return Cut(CutKind.INSECURE, neg_until, reason=f"{parent.zone}: {out.reason}", ede=out.ede)
        return Cut(CutKind.NONE, neg_until)

    async def _keys(self, zone: dns.name.Name, cut: Cut | None, now: float) -> ZoneKeys:
        zk = self._zones.get(zone, now)
        if zk is not None:
            return zk
        zk = await self._once(("keys", zone), lambda: self._fetch_keys(zone, cut, now))
        self._zones.put(zone, zk)
        return zk

    async def _fetch_keys(self, zone: dns.name.Name, cut: Cut | None, now: float) -> ZoneKeys:
        anchor = self.anchors.get(zone) if cut is None else None
        ds_list = list(cut.ds) if cut is not None else list(anchor.ds if anchor else ())
        ds_ok = crypto.usable_ds(ds_list)
        anchor_keys = [k for k in (anchor.dnskeys if anchor else ()) if k.algorithm in crypto.SUPPORTED_ALGORITHMS]
        bad_until = now + self.bogus_ttl
        if not ds_ok and not anchor_keys:
            return ZoneKeys(zone, Status.INSECURE, expires=cut.expires if cut else now + self.max_key_ttl,
                            reason=f"trust anchor for {zone} uses only unsupported algorithms",
                            ede=EDE.UNSUPPORTED_DNSKEY_ALGORITHM)
        msg = await self._query(zone, DNSKEY)
        rrset = _find(msg.answer, zone, DNSKEY)
        if rrset is None:
            return ZoneKeys(zone, Status.BOGUS, expires=bad_until, reason=f"{zone} has no DNSKEY records",
                            ede=EDE.DNSKEY_MISSING)
        anchor_wire = {k.to_digestable() for k in anchor_keys}
        sep = [k for k in rrset if k.to_digestable() in anchor_wire
               or any(crypto.ds_matches(d, zone, k) for d in ds_ok)]
        if not sep:
            return ZoneKeys(zone, Status.BOGUS, expires=bad_until,
                            reason=f"no DNSKEY of {zone} matches its DS / trust anchor", ede=EDE.DNSKEY_MISSING)
        v = crypto.verify_rrset(rrset, _find(msg.answer, zone, RRSIG, DNSKEY), zone, sep, now, self._keycache)
        if isinstance(v, crypto.VerifyFailure):
            return ZoneKeys(zone, Status.BOGUS, expires=bad_until, reason=f"{zone} DNSKEY: {v.reason}", ede=v.ede)
        until = now + min(rrset.ttl, v.rrsig.original_ttl, max(0, v.expires - now), self.max_key_ttl)
        if cut is not None:
            until = min(until, cut.expires)
        return ZoneKeys(zone, Status.SECURE, keys=crypto.KeySet(rrset), expires=until,
                        reason=f"{zone} keys validated", fetched=now)
