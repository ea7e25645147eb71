"""Name lookups the mail delivery needs (MX, A/AAAA, TLSA, TXT), behind one small interface.

Owns: the `MailResolver` protocol and its answer shape, the adapter onto the DNS service's own
validating resolver (`protocols.dns.resolver.Resolver`, DoT + DNSSEC), a system fallback that can
only resolve addresses (never proves anything, so DANE/MTA-STS/MX delivery through it fail closed),
and a static table resolver for embedding and tests.
Must not: send DNS itself, or ever report an answer as `secure` that a validator did not prove.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

SECURE, INSECURE, BOGUS, INDETERMINATE = "secure", "insecure", "bogus", "indeterminate"


@dataclass(frozen=True, slots=True)
class TLSARecord:
    usage: int
    selector: int
    mtype: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    """`values`: MX → ((pref, host), ...); A/AAAA → (ip, ...); TLSA → (TLSARecord, ...); TXT → (str, ...).
    `rcode` is "NOERROR" (values may be empty: NODATA), "NXDOMAIN", or "SERVFAIL" (lookup failed)."""

    values: tuple[Any, ...] = ()
    status: str = INSECURE  # secure | insecure | bogus | indeterminate
    rcode: str = "NOERROR"
    ttl: int = 0

    @property
    def secure(self) -> bool:
        return self.status == SECURE

    @property
    def failed(self) -> bool:
        """The lookup proved nothing: retry later, never act on it."""
        return self.rcode not in ("NOERROR", "NXDOMAIN") or self.status in (BOGUS, INDETERMINATE)


class MailResolver(Protocol):
    async def mx(self, domain: str) -> Answer: ...

    async def address(self, name: str) -> Answer: ...

    async def tlsa(self, name: str) -> Answer: ...

    async def txt(self, name: str) -> Answer: ...


def _ip_literal(name: str) -> str | None:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return None


class StaticResolver:
    """Fixed answers: {("mx", "example.org"): Answer(...), ("address", "mx.example.org"): Answer(...)}.
    Unknown names are NXDOMAIN (insecure). Used for embedding (relay `address`) and for tests that
    cannot have a signed zone lab."""

    def __init__(self, table: Mapping[tuple[str, str], Answer] | None = None):
        self.table = {(k, n.lower().rstrip(".")): v for (k, n), v in (table or {}).items()}
        self.queries: list[tuple[str, str]] = []

    async def _get(self, kind: str, name: str) -> Answer:
        key = (kind, name.lower().rstrip("."))
        self.queries.append(key)
        return self.table.get(key, Answer(rcode="NXDOMAIN"))

    async def mx(self, domain: str) -> Answer:
        return await self._get("mx", domain)

    async def address(self, name: str) -> Answer:
        ip = _ip_literal(name)
        if ip:
            return Answer((ip,))
        return await self._get("address", name)

    async def tlsa(self, name: str) -> Answer:
        return await self._get("tlsa", name)

    async def txt(self, name: str) -> Answer:
        return await self._get("txt", name)


class SystemResolver:
    """The host's resolver, for addresses only (a relay's name when no `dns:` section exists).
    MX/TLSA/TXT answer SERVFAIL: without our validating resolver nothing can be proven."""

    async def address(self, name: str) -> Answer:
        ip = _ip_literal(name)
        if ip:
            return Answer((ip,))
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                return Answer(rcode="NXDOMAIN")
            return Answer(rcode="SERVFAIL")
        return Answer(tuple(dict.fromkeys(str(i[4][0]) for i in infos)))

    async def mx(self, domain: str) -> Answer:
        return Answer(rcode="SERVFAIL", status=INDETERMINATE)

    async def tlsa(self, name: str) -> Answer:
        return Answer(rcode="SERVFAIL", status=INDETERMINATE)

    async def txt(self, name: str) -> Answer:
        return Answer(rcode="SERVFAIL", status=INDETERMINATE)


class ValidatingResolver:
    """Adapter onto the DNS service's in-process resolver (DoT upstreams + our DNSSEC validator):
    `await r.resolve_validated(name, "MX") -> Resolved(rcode, rrset, status, ede, ttl)`."""

    def __init__(self, inner: Any):
        self.inner = inner

    async def close(self) -> None:
        await self.inner.close()

    async def _q(self, name: str, rdtype: str) -> tuple[Answer, list[Any]]:
        try:
            res = await self.inner.resolve_validated(name, rdtype)
        except Exception as e:  # the lookup failed: nothing proven, deliver later
            return Answer(rcode="SERVFAIL", status=INDETERMINATE), [e]
        rcode = str(getattr(res, "rcode", "NOERROR"))
        rcode = {"0": "NOERROR", "2": "SERVFAIL", "3": "NXDOMAIN"}.get(rcode, rcode).upper()
        if "." in rcode:  # an enum's str() such as "Rcode.NXDOMAIN"
            rcode = rcode.rsplit(".", 1)[1]
        rrset = getattr(res, "rrset", None)
        items = list(rrset) if rrset is not None else []
        status = str(getattr(res, "status", INSECURE))
        return Answer((), status=status, rcode=rcode, ttl=int(getattr(res, "ttl", 0) or 0)), items

    async def mx(self, domain: str) -> Answer:
        a, items = await self._q(domain, "MX")
        vals = tuple((int(r.preference), r.exchange.to_text(omit_final_dot=True).lower()) for r in items)
        return Answer(vals, a.status, a.rcode, a.ttl)

    async def address(self, name: str) -> Answer:
        ip = _ip_literal(name)
        if ip:
            return Answer((ip,))
        out: list[str] = []
        statuses: list[Answer] = []
        for rdtype in ("A", "AAAA"):
            a, items = await self._q(name, rdtype)
            statuses.append(a)
            out.extend(r.address for r in items if hasattr(r, "address"))
        if out:
            worst = SECURE if all(s.status == SECURE for s in statuses) else INSECURE
            if any(s.status == BOGUS for s in statuses):
                return Answer(rcode="SERVFAIL", status=BOGUS)
            return Answer(tuple(out), worst, "NOERROR", min(s.ttl for s in statuses))
        first = statuses[0]
        return Answer((), first.status, first.rcode, first.ttl)

    async def tlsa(self, name: str) -> Answer:
        a, items = await self._q(name, "TLSA")
        vals = tuple(TLSARecord(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert)) for r in items)
        return Answer(vals, a.status, a.rcode, a.ttl)

    async def txt(self, name: str) -> Answer:
        a, items = await self._q(name, "TXT")
        vals = tuple(b"".join(r.strings).decode("utf-8", "replace") for r in items)
        return Answer(vals, a.status, a.rcode, a.ttl)


def make_resolver(config: Any) -> MailResolver:
    """Our own validating resolver when the config has a `dns:` section and the DNS service's
    resolver is importable; otherwise the address-only system resolver (relay mode works,
    MX/DANE/MTA-STS delivery defers)."""
    dns_settings = getattr(config, "dns", None) if config is not None else None
    if dns_settings is not None:
        try:
            from protocols.dns.resolver import Resolver  # the DNS engineer's module (issue 3)
        except ImportError:
            return SystemResolver()
        return ValidatingResolver(Resolver.from_settings(dns_settings))
    return SystemResolver()
