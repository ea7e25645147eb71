"""MTA-STS (RFC 8461): discover, fetch, cache and apply a recipient domain's policy.

Owns: the `_mta-sts` TXT record check, the policy fetch over verified HTTPS
(https://mta-sts.<domain>/.well-known/mta-sts.txt, no redirects, size-capped), policy parsing, the
cache (memory + a JSON file per domain in the state directory) and MX pattern matching.
Must not: weaken anything — delivery is always CA/name-verified whatever the policy says; a policy
only adds the MX-name restriction in `enforce` mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from protocols.smtp.resolver import MailResolver

MAX_POLICY_BYTES = 64 * 1024
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


@dataclass(frozen=True, slots=True)
class STSPolicy:
    domain: str
    id: str
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]
    max_age: int
    fetched: float

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.max_age

    def mx_allowed(self, host: str) -> bool:
        return any(mx_matches(p, host) for p in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: "*.example.com" matches exactly one label in place of "*"."""
    p, h = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if p.startswith("*."):
        head, _, rest = h.partition(".")
        return bool(head) and rest == p[2:]
    return p == h


def parse_txt(records: tuple[str, ...]) -> str | None:
    """The policy id from the `_mta-sts` TXT RRset, or None (absent, several, or malformed)."""
    found = [r for r in records if r.startswith("v=STSv1")]
    if len(found) != 1:
        return None
    fields = dict(f.strip().partition("=")[::2] for f in found[0].split(";") if f.strip())
    ident = fields.get("id", "").strip()
    return ident if _ID.match(ident) else None


def parse_policy(text: str, domain: str, ident: str, now: float) -> STSPolicy:
    fields: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        key, sep, val = line.partition(":")
        if not sep:
            raise ValueError(f"bad policy line {line[:40]!r}")
        key, val = key.strip(), val.strip()
        if key == "mx":
            mx.append(val)
        else:
            fields.setdefault(key, val)
    if fields.get("version") != "STSv1":
        raise ValueError("policy version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise ValueError(f"bad policy mode {mode!r}")
    try:
        max_age = int(fields.get("max_age", ""))
    except ValueError:
        raise ValueError("bad policy max_age") from None
    if not 0 <= max_age <= 31_557_600:
        raise ValueError("policy max_age out of range")
    if mode != "none" and not mx:
        raise ValueError("policy has no mx patterns")
    return STSPolicy(domain, ident, mode, tuple(mx), max_age, now)


class MTASTS:
    """Policy source for recipient domains. `port` exists for test labs (RFC 8461 fixes 443)."""

    def __init__(self, resolver: MailResolver, context: ssl.SSLContext, clock: Callable[[], float],
                 cache_dir: Path | None, *, port: int = 443, timeout: float = 30.0):
        self.resolver = resolver
        self.context = context
        self.clock = clock
        self.cache_dir = cache_dir
        self.port = port
        self.timeout = timeout
        self._cache: dict[str, STSPolicy] = {}

    def _cached(self, domain: str) -> STSPolicy | None:
        p = self._cache.get(domain)
        if p is None and self.cache_dir is not None:
            f = self.cache_dir / f"{domain}.json"
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                d = json.loads(f.read_text())
                d["mx"] = tuple(d["mx"])
                p = STSPolicy(**d)
                self._cache[domain] = p
        if p is not None and p.expired(self.clock()):
            return None
        return p

    def _store(self, p: STSPolicy) -> None:
        self._cache[p.domain] = p
        if self.cache_dir is not None:
            with contextlib.suppress(OSError):
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = self.cache_dir / f".{p.domain}.tmp"
                tmp.write_text(json.dumps(asdict(p)))
                tmp.replace(self.cache_dir / f"{p.domain}.json")

    async def policy(self, domain: str) -> STSPolicy | None:
        """The policy in force for `domain`, or None (no MTA-STS; delivery stays CA-verified)."""
        domain = domain.lower().rstrip(".")
        cached = self._cached(domain)
        txt = await self.resolver.txt(f"_mta-sts.{domain}")
        ident = None if txt.failed else parse_txt(txt.values)
        if ident is None:
            return cached  # RFC 8461 §5.1: an unexpired cached policy stays in force
        if cached is not None and cached.id == ident:
            return cached
        try:
            text = await self.fetch(domain)
            p = parse_policy(text, domain, ident, self.clock())
        except (OSError, ValueError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
            return cached
        self._store(p)
        return p

    async def fetch(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        addrs = await self.resolver.address(host)
        if addrs.failed or not addrs.values:
            raise OSError(f"cannot resolve {host}")
        last: Exception = OSError("no address")
        for ip in addrs.values:
            try:
                return await asyncio.wait_for(self._get(ip, host), self.timeout)
            except (OSError, ValueError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError) as e:
                last = e
        raise last

    async def _get(self, ip: str, host: str) -> str:
        reader, writer = await asyncio.open_connection(ip, self.port, ssl=self.context, server_hostname=host)
        try:
            writer.write(
                f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                "User-Agent: proxyvm\r\n\r\n".encode("ascii"))
            await writer.drain()
            data = await reader.read(MAX_POLICY_BYTES + 16384)
            while len(data) < MAX_POLICY_BYTES + 16384:
                more = await reader.read(65536)
                if not more:
                    break
                data += more
        finally:
            writer.close()
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("bad HTTP response")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            raise ValueError(f"policy fetch answered {status_line[:60]!r}")  # no redirects (§3.3)
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        if not headers.get("content-type", "").lower().startswith("text/plain"):
            raise ValueError("policy is not text/plain")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = _dechunk(body)
        elif "content-length" in headers:
            body = body[: int(headers["content-length"])]
        if len(body) > MAX_POLICY_BYTES:
            raise ValueError("policy too large")
        return body.decode("utf-8")


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out
