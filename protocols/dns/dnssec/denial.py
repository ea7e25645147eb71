"""Authenticated denial of existence: NSEC (RFC 4035 §5.4) and NSEC3 (RFC 5155 §8) proofs.

Owns: deciding, from NSEC/NSEC3 records *already verified* with the zone's keys, whether a name does
not exist (NXDOMAIN), a type does not exist (NODATA, empty non-terminals, wildcard NODATA), a wildcard
expansion was legitimate, or a delegation has no DS (insecure delegation, NSEC3 opt-out); and the
RFC 9276 iteration cap.
Must not: verify signatures, fetch, or keep state — it is a set of pure functions.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Container, Sequence
from dataclasses import dataclass
from enum import StrEnum

import dns.name
import dns.rdatatype
import dns.rrset

from .result import EDE

# RFC 9276 §3.2: validators may treat NSEC3 iterations above a limit as insecure. 150 matches what
# BIND 9.18 and Unbound 1.17 do (both refuse to spend more), and what dnssec-signzone will produce.
MAX_NSEC3_ITERATIONS = 150

NS, SOA, DS, CNAME, DNAME = (dns.rdatatype.NS, dns.rdatatype.SOA, dns.rdatatype.DS,
                             dns.rdatatype.CNAME, dns.rdatatype.DNAME)


class Denial(StrEnum):
    SECURE = "secure"  # the proof holds
    INSECURE = "insecure"  # the proof holds only up to an opt-out span / uncheckable parameters
    BOGUS = "bogus"  # no valid proof


@dataclass(frozen=True, slots=True)
class DenialOutcome:
    status: Denial
    reason: str
    ede: int | None = None
    delegation: bool = False  # for DS NODATA: the name is proven to be a delegation without DS

    @property
    def ok(self) -> bool:
        return self.status != Denial.BOGUS


class _TypeName:
    """A type's mnemonic, formatted only when a failure message needs it."""

    __slots__ = ("rdtype",)

    def __init__(self, rdtype: int) -> None:
        self.rdtype = rdtype

    def __format__(self, spec: str) -> str:
        return dns.rdatatype.to_text(self.rdtype)


def _bogus(reason: str) -> DenialOutcome:
    return DenialOutcome(Denial.BOGUS, reason, EDE.NSEC_MISSING)


def _nodata_by_bitmap(kind: str, name: dns.name.Name, rdtype: int, tname: object,
                      types: Container[int]) -> DenialOutcome:
    """NODATA from the type bitmap of the NSEC / NSEC3 record that matches `name` (RFC 4035
    §5.4, RFC 5155 §8.5-8.6): the type and CNAME absent, and the record from the right side of a
    zone cut (a DS denial comes from the parent, anything else not from a delegation point)."""
    at = "at" if kind == "NSEC" else "for"
    if rdtype in types:
        return _bogus(f"{kind} {at} {name} lists {tname}")
    if CNAME in types and rdtype != CNAME:
        return _bogus(f"{kind} {at} {name} lists CNAME")
    delegation = NS in types and SOA not in types
    if rdtype == DS:
        if SOA in types and name != dns.name.root:
            return _bogus(f"{kind} for {name} DS comes from the child zone")
    elif delegation:
        return _bogus(f"{kind} {at} {name} is the parent's delegation record")
    return DenialOutcome(Denial.SECURE, f"{kind} proves the type does not exist", delegation=delegation)


def _types(rrset: dns.rrset.RRset) -> set[int]:
    out: set[int] = set()
    for rd in rrset:
        for window, bitmap in rd.windows:
            for i, byte in enumerate(bitmap):
                for bit in range(8):
                    if byte & (0x80 >> bit):
                        out.add(window * 256 + i * 8 + bit)
    return out


# ---------------------------------------------------------------- NSEC (RFC 4035 §5.4, RFC 4034 §4)


def _nsec_covers(owner: dns.name.Name, nxt: dns.name.Name, name: dns.name.Name) -> bool:
    if owner < nxt:
        return owner < name < nxt
    return name > owner or name < nxt  # the last NSEC of the zone points back to the apex


def _common(a: dns.name.Name, b: dns.name.Name) -> int:
    return a.fullcompare(b)[2]


class NSECProof:
    def __init__(self, zone: dns.name.Name, rrsets: Sequence[dns.rrset.RRset]) -> None:
        self.zone = zone
        self.records = [(r.name, r[0].next, _types(r)) for r in rrsets if len(r) and r.name.is_subdomain(zone)]

    def _matching(self, name: dns.name.Name):
        for owner, nxt, types in self.records:
            if owner == name:
                return owner, nxt, types
        return None

    def _covering(self, name: dns.name.Name):
        for owner, nxt, types in self.records:
            if owner != name and _nsec_covers(owner, nxt, name):
                # An NSEC at a delegation point (NS without SOA) or at a DNAME says nothing about names
                # beneath it: those live in another zone (RFC 6840 §4.1).
                if name.is_subdomain(owner) and ((NS in types and SOA not in types) or DNAME in types):
                    continue
                return owner, nxt, types
        return None

    def _closest_encloser(self, name: dns.name.Name, owner: dns.name.Name, nxt: dns.name.Name) -> dns.name.Name:
        n = max(_common(name, owner), _common(name, nxt))
        ce = name.split(n)[1]
        return ce if ce.is_subdomain(self.zone) else self.zone

    def nxdomain(self, name: dns.name.Name) -> DenialOutcome:
        cov = self._covering(name)
        if cov is None:
            return _bogus(f"no NSEC proves that {name} does not exist")
        ce = self._closest_encloser(name, cov[0], cov[1])
        wc = dns.name.Name((b"*",) + ce.labels)
        if self._matching(wc) is not None or self._covering(wc) is None:
            return _bogus(f"no NSEC proves that wildcard {wc} does not exist")
        return DenialOutcome(Denial.SECURE, "NSEC proves the name does not exist")

    def nodata(self, name: dns.name.Name, rdtype: int) -> DenialOutcome:
        tname = _TypeName(rdtype)
        m = self._matching(name)
        if m is not None:
            return _nodata_by_bitmap("NSEC", name, rdtype, tname, m[2])
        # Empty non-terminal: an NSEC whose next name lies below `name` proves `name` exists without data.
        for owner, nxt, _ in self.records:
            if owner < name < nxt and nxt.is_subdomain(name):
                return DenialOutcome(Denial.SECURE, "NSEC proves an empty non-terminal")
        cov = self._covering(name)
        if cov is not None:
            ce = self._closest_encloser(name, cov[0], cov[1])
            wc = dns.name.Name((b"*",) + ce.labels)
            w = self._matching(wc)
            if w is not None and rdtype not in w[2] and CNAME not in w[2]:
                return DenialOutcome(Denial.SECURE, "NSEC proves the wildcard has no such type")
        return _bogus(f"no NSEC proves that {name} has no {tname}")

    def wildcard(self, name: dns.name.Name, labels: int) -> DenialOutcome:
        # RFC 4035 §5.3.4: the expanded name must be proven not to exist, and no name closer to it than
        # the wildcard's parent may exist (else that closer name, not the wildcard, would answer).
        cov = self._covering(name)
        if cov is None:
            return _bogus(f"no NSEC proves that {name} does not exist (wildcard expansion)")
        if len(self._closest_encloser(name, cov[0], cov[1])) > labels + 1:
            return _bogus(f"NSEC shows a closer encloser of {name} than the wildcard's parent")
        return DenialOutcome(Denial.SECURE, "NSEC proves the wildcard expansion")


# ---------------------------------------------------------------- NSEC3 (RFC 5155 §8)


def nsec3_hash(name: dns.name.Name, salt: bytes, iterations: int) -> bytes:
    digest = hashlib.sha1(name.canonicalize().to_wire() + salt).digest()
    for _ in range(iterations):
        digest = hashlib.sha1(digest + salt).digest()
    return digest


class NSEC3Proof:
    def __init__(self, zone: dns.name.Name, rrsets: Sequence[dns.rrset.RRset]) -> None:
        self.zone = zone
        self.records: list[tuple[bytes, bytes, set[int], bool]] = []
        self.too_many_iterations = False
        self.params: tuple[bytes, int] | None = None
        self._hashes: dict[dns.name.Name, bytes] = {}
        for r in rrsets:
            if not len(r) or r.name.parent() != zone:
                continue
            rd = r[0]
            if rd.algorithm != 1 or rd.flags & 0xFE:
                continue  # RFC 5155 §8.1/§8.2: unknown hash algorithm or flags: ignore the record
            if rd.iterations > MAX_NSEC3_ITERATIONS:
                self.too_many_iterations = True
                continue
            if self.params is None:
                self.params = (rd.salt, rd.iterations)
            elif self.params != (rd.salt, rd.iterations):
                continue  # one NSEC3 chain per answer; a different parameter set is ignored
            try:
                owner = base64.b32hexdecode(r.name.labels[0].upper())
            except ValueError:
                continue
            self.records.append((owner, rd.next, _types(r), bool(rd.flags & 1)))

    def _h(self, name: dns.name.Name) -> bytes:
        h = self._hashes.get(name)
        if h is None:
            assert self.params is not None
            h = self._hashes[name] = nsec3_hash(name, self.params[0], self.params[1])
        return h

    def _matching(self, name: dns.name.Name):
        h = self._h(name)
        for rec in self.records:
            if rec[0] == h:
                return rec
        return None

    def _covering(self, name: dns.name.Name):
        h = self._h(name)
        for rec in self.records:
            owner, nxt = rec[0], rec[1]
            if (owner < h < nxt) if owner < nxt else (h > owner or h < nxt):
                return rec
        return None

    def _unusable(self) -> DenialOutcome | None:
        if self.records:
            return None
        if self.too_many_iterations:
            return DenialOutcome(Denial.INSECURE, f"NSEC3 iterations above {MAX_NSEC3_ITERATIONS} (RFC 9276)",
                                 EDE.UNSUPPORTED_NSEC3_ITERATIONS)
        return _bogus("no usable NSEC3 records")

    def _closest_encloser(self, name: dns.name.Name):
        """RFC 5155 §8.3: (closest encloser, NSEC3 covering the next closer name) or a failure reason."""
        nc = None
        c = name
        while True:
            m = self._matching(c)
            if m is not None:
                if DNAME in m[2] or (NS in m[2] and SOA not in m[2] and c != name):
                    return None, f"closest encloser {c} is a delegation or DNAME"
                break
            if c == self.zone or len(c) <= 1:
                return None, f"no NSEC3 matches an encloser of {name}"
            nc = c
            c = c.parent()
        if nc is None:
            return c, None  # `name` itself exists
        cov = self._covering(nc)
        if cov is None:
            return None, f"no NSEC3 covers next closer name {nc}"
        return c, cov

    def nxdomain(self, name: dns.name.Name) -> DenialOutcome:
        if (u := self._unusable()) is not None:
            return u
        ce, cov = self._closest_encloser(name)
        if ce is None:
            return _bogus(str(cov))
        if cov is None:
            return _bogus(f"NSEC3 shows that {name} exists")
        wc = dns.name.Name((b"*",) + ce.labels)
        if self._covering(wc) is None:
            return _bogus(f"no NSEC3 proves that wildcard {wc} does not exist")
        if cov[3]:
            # RFC 5155 §9.2 / RFC 7129 §5.1: an opt-out span may hide an unsigned delegation.
            return DenialOutcome(Denial.INSECURE, f"{name} lies in an NSEC3 opt-out span")
        return DenialOutcome(Denial.SECURE, "NSEC3 proves the name does not exist")

    def nodata(self, name: dns.name.Name, rdtype: int) -> DenialOutcome:
        if (u := self._unusable()) is not None:
            return u
        tname = _TypeName(rdtype)
        m = self._matching(name)
        if m is not None:
            return _nodata_by_bitmap("NSEC3", name, rdtype, tname, m[2])
        ce, cov = self._closest_encloser(name)
        if ce is None:
            return _bogus(str(cov))
        if cov is None:
            return _bogus(f"no NSEC3 matches {name}")
        if rdtype == DS:
            # RFC 5155 §8.6: no DS at an opt-out delegation.
            if cov[3]:
                return DenialOutcome(Denial.INSECURE, f"{name} lies in an NSEC3 opt-out span", delegation=True)
            return _bogus(f"NSEC3 covering {name} has no opt-out")
        wc = dns.name.Name((b"*",) + ce.labels)
        w = self._matching(wc)
        if w is not None and rdtype not in w[2] and CNAME not in w[2]:
            return DenialOutcome(Denial.SECURE, "NSEC3 proves the wildcard has no such type")
        return _bogus(f"no NSEC3 proves that {name} has no {tname}")

    def wildcard(self, name: dns.name.Name, labels: int) -> DenialOutcome:
        if (u := self._unusable()) is not None:
            return u
        # RFC 5155 §8.8: the next closer name (one label more than the wildcard's encloser) is covered.
        nc = name.split(labels + 2)[1] if len(name) > labels + 2 else name
        if self._covering(nc) is None:
            return _bogus(f"no NSEC3 covers {nc} (wildcard expansion of {name})")
        return DenialOutcome(Denial.SECURE, "NSEC3 proves the wildcard expansion")
