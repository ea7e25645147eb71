"""An in-process resolver for the other services (SMTP: MX, TLSA, MTA-STS TXT; HTTP: Host names).

Owns: `Resolver` (`from_settings`, `resolve_validated`, `close`) and its frozen `Resolved` result.
It runs on the same Forwarder as the guest-facing service: the same DoT pool (never plaintext),
cache and DNSSEC validator, asking as a DO=1 client so the validation status is known.
Must not: consult the guest policy (these lookups are the proxy's own) or return records from an
answer the validator called bogus (those come back as SERVFAIL with the EDE).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from protocols.dns import wire
from protocols.dns.cache import E, wire_at
from protocols.dns.forwarder import Forwarder, Resolution
from protocols.dns.settings import DNSSettings

_MAX_CNAME_CHAIN = 16


@dataclass(frozen=True, slots=True)
class Resolved:
    rcode: int  # dns.rcode value: NOERROR, NXDOMAIN, SERVFAIL...
    rrset: list[Any] = field(default_factory=list)  # dnspython rdata of the asked type, CNAMEs followed
    status: str = "indeterminate"  # "secure" | "insecure" | "bogus" | "indeterminate"
    ede: int | None = None
    ttl: int = 0

    @property
    def secure(self) -> bool:
        return self.status == "secure"


_STRENGTH = {"secure": 3, "insecure": 2, "indeterminate": 1, "bogus": 0}


def _weakest(statuses: list[str]) -> str:
    return min(statuses, key=lambda s: _STRENGTH.get(s, 0))


class Resolver:
    """`resolver = Resolver.from_settings(config.dns)`; `await resolver.resolve_validated(
    "example.org", "MX")`; `await resolver.close()`."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.fw = forwarder

    @classmethod
    def from_settings(cls, dns_settings: DNSSettings | None, *, log: logging.Logger | None = None) -> Resolver:
        return cls(Forwarder(dns_settings or DNSSettings(), log or logging.getLogger("proxyvm.dns.resolver")))

    async def resolve_validated(self, name: str, rdtype: str | int) -> Resolved:
        """Look `name` up over DoT (validated when `dnssec: validate`), following CNAMEs — within
        one answer and, when the upstream left the chain open, with further lookups. The status
        is "secure" only when every link was secure. With dnssec off it is "insecure": nothing
        was proven."""
        t = dns.rdatatype.from_text(rdtype) if isinstance(rdtype, str) else dns.rdatatype.RdataType.make(rdtype)
        target = dns.name.from_text(name) if not isinstance(name, dns.name.Name) else name
        statuses: list[str] = []
        ttl: int | None = None
        for _ in range(_MAX_CNAME_CHAIN):
            res, next_name = await self._one(target, t)
            statuses.append(res.status)
            ttl = res.ttl if ttl is None else min(ttl, res.ttl)
            if next_name is None or res.rcode != dns.rcode.NOERROR:
                return Resolved(res.rcode, res.rrset, _weakest(statuses), res.ede, ttl if res.rrset else res.ttl)
            target = next_name
        return Resolved(dns.rcode.SERVFAIL, [], _weakest(statuses), None, 0)  # a CNAME loop

    async def _one(self, qname: dns.name.Name, t: dns.rdatatype.RdataType) -> tuple[Resolved, dns.name.Name | None]:
        """One lookup; returns the result and the CNAME target still to follow (or None)."""
        question = qname.canonicalize().to_wire() + struct.pack("!HH", t, dns.rdataclass.IN)
        key = question + bytes((wire.KEY_EDNS | wire.KEY_DO,))
        fw = self.fw
        entry = fw.cache.get(key, fw.clock())
        if entry is None:
            try:
                entry = await fw.resolve(key, qname.to_text(omit_final_dot=True).lower(), dns.rdatatype.to_text(t))
            except Resolution as r:
                return Resolved(dns.rcode.SERVFAIL, [], "indeterminate", r.ede, 0), None
        status = entry[E.STATUS] or ("insecure" if fw.validator is None else "indeterminate")
        if entry[E.RCODE] != dns.rcode.NOERROR:
            return Resolved(entry[E.RCODE], [], status, entry[E.EDE], max(0, int(entry[E.EXPIRES] - fw.clock()))), None
        msg = dns.message.from_wire(bytes(wire_at(entry, fw.clock())))
        target = msg.question[0].name
        ttl = 2**31
        for _ in range(_MAX_CNAME_CHAIN):
            found = msg.get_rrset(msg.answer, target, dns.rdataclass.IN, t)
            if found is not None:
                return Resolved(dns.rcode.NOERROR, list(found), status, entry[E.EDE], min(ttl, found.ttl)), None
            cname = msg.get_rrset(msg.answer, target, dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None or t == dns.rdatatype.CNAME:
                break
            ttl = min(ttl, cname.ttl)
            target = cname[0].target
        if target != msg.question[0].name:
            return Resolved(dns.rcode.NOERROR, [], status, entry[E.EDE], ttl), target
        return Resolved(dns.rcode.NOERROR, [], status, entry[E.EDE], 0), None

    async def close(self) -> None:
        await self.fw.close()


async def _main(argv: list[str]) -> int:  # pragma: no cover - a manual check: python -m protocols.dns.resolver
    r = Resolver.from_settings(None)
    t0 = time.monotonic()
    res = await r.resolve_validated(argv[0], argv[1] if len(argv) > 1 else "A")
    print(res, f"{(time.monotonic() - t0) * 1000:.1f} ms")
    await r.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    raise SystemExit(asyncio.run(_main(sys.argv[1:])))
