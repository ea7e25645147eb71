"""Turning the Host a guest named into the address the proxy connects to.

Owns: the order of sources (IP literal, the `http.hosts` table, the proxy's own validated DNS
resolver when a `dns:` section is configured, else the system resolver), a small bounded cache
honouring TTLs, and the error text a guest sees when a name does not resolve.
Must not: decide policy (the SSRF guard is the addon's), or fall back to the system resolver when a
`dns:` section exists (a name our DNS refuses must not be resolved around it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.rcode


@dataclass(frozen=True, slots=True)
class Resolution:
    addresses: tuple[str, ...]
    source: str  # "literal" | "hosts" | "dns" | "system"
    error: str = ""  # non-empty: the name did not resolve (text for the 502 and the audit)


class UpstreamResolver:
    """Resolve upstream host names. `dns_settings` is `config.dns` (or None)."""

    MAX_CACHE = 4096

    def __init__(
        self,
        dns_settings: Any = None,
        hosts: tuple[tuple[str, tuple[str, ...]], ...] = (),
        *,
        timeout: float = 5.0,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hosts = dict(hosts)
        self.timeout = timeout
        self.log = log or logging.getLogger("proxyvm.http")
        self.clock = clock
        self._cache: OrderedDict[str, tuple[float, Resolution]] = OrderedDict()
        self._dns: Any = None
        self.source = "system"
        if dns_settings is not None:
            from protocols.dns.resolver import Resolver  # imported only when DNS is configured

            self._dns = Resolver.from_settings(dns_settings, log=self.log)
            self.source = "dns"

    async def close(self) -> None:
        if self._dns is not None:
            await self._dns.close()

    async def resolve(self, host: str) -> Resolution:
        if host in self.hosts:
            return Resolution(self.hosts[host], "hosts")
        now = self.clock()
        hit = self._cache.get(host)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(host)
            return hit[1]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            res = Resolution((host,), "literal")
            self._cache[host] = (now + 3600.0, res)
            return res
        try:
            async with asyncio.timeout(self.timeout):
                res, ttl = await (self._via_dns(host) if self._dns is not None else self._via_system(host))
        except TimeoutError:
            res, ttl = Resolution((), self.source, "timed out resolving the host"), 5.0
        self._cache[host] = (now + max(1.0, min(ttl, 300.0)), res)
        self._cache.move_to_end(host)
        while len(self._cache) > self.MAX_CACHE:
            self._cache.popitem(last=False)
        return res

    async def _via_dns(self, host: str) -> tuple[Resolution, float]:
        errors = []
        for qtype in ("A", "AAAA"):
            r = await self._dns.resolve_validated(host, qtype)
            if int(r.rcode) == 0 and r.rrset:
                addrs = tuple(str(rd.address) for rd in r.rrset if hasattr(rd, "address"))
                if addrs:
                    return Resolution(addrs, "dns"), float(r.ttl or 60)
            rcode = dns.rcode.to_text(int(r.rcode))
            ede = f", EDE {r.ede}" if r.ede is not None else ""
            errors.append(f"{qtype}: {rcode if r.rcode else 'no address'} ({r.status}{ede})")
        return Resolution((), "dns", "cannot resolve host (" + "; ".join(errors) + ")"), 5.0

    async def _via_system(self, host: str) -> tuple[Resolution, float]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            return Resolution((), "system", f"cannot resolve host ({e})"), 5.0
        addrs: list[str] = []
        for fam, *_rest, sa in infos:
            if fam in (socket.AF_INET, socket.AF_INET6) and sa[0] not in addrs:
                addrs.append(str(sa[0]))
        if not addrs:
            return Resolution((), "system", "cannot resolve host (no address)"), 5.0
        return Resolution(tuple(addrs), "system"), 30.0
