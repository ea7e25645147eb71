"""The `http:` configuration section: typed, frozen settings and their located parser.

Owns: the schema of the `http:` section (the three guest-side listeners, the upstream CA file,
limits, timeouts, X-Forwarded-For, the SSRF guard, the WebSocket message limit, the number of
SO_REUSEPORT worker processes) and its defaults.
Must not: open sockets or read certificate files (only check that configured paths exist); there is
deliberately no setting that disables upstream certificate verification — plaintext is a policy
decision (`plaintext: true` on a rule), never a config switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from policy.source import Node
from protocols.listen import Address, parse_listen


@dataclass(frozen=True, slots=True)
class LimitSettings:
    header_size: int = 64 * 1024  # request line + headers; over it: 431
    body: int = 0  # request body cap for every request (0 = none; rules may set max_body)
    stream_above: int = 1024 * 1024  # bodies above this are streamed, never buffered whole
    ws_message: int = 16 * 1024 * 1024  # one WebSocket message; over it the connection is closed (1009)
    connections: int = 4096  # open guest connections per worker; over it new ones are closed


@dataclass(frozen=True, slots=True)
class TimeoutSettings:
    header: float = 10.0  # a request's line + headers must arrive within this (slowloris); 408
    idle: float = 60.0  # no byte either way for this long closes the connection (WebSocket too);
    # it also bounds an upstream TCP connect + TLS handshake (mitmproxy has no separate connect timeout)
    dns: float = 5.0  # resolving the Host through the proxy's resolver


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    listen: tuple[Address, ...] = ()  # transparent port-80 listeners (upgraded to https://Host:443)
    proxy_listen: tuple[Address, ...] = ()  # explicit proxy (HTTP_PROXY): absolute-form + CONNECT
    passthrough_listen: tuple[Address, ...] = ()  # guest TLS on 443, decided by SNI, spliced
    ca_file: Path | None = None  # upstream trust anchors; None: the system trust store
    x_forwarded_for: bool = False  # add X-Forwarded-For with the guest address
    ssrf_guard: bool = True  # deny private/loopback/link-local/metadata targets unless a rule names them
    workers: int = 1  # processes sharing each listening port (SO_REUSEPORT)
    hosts: tuple[tuple[str, tuple[str, ...]], ...] = ()  # static name -> addresses, before DNS
    limits: LimitSettings = field(default_factory=LimitSettings)
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)

    @property
    def all_listeners(self) -> tuple[tuple[str, Address], ...]:
        return (
            tuple(("transparent", a) for a in self.listen)
            + tuple(("proxy", a) for a in self.proxy_listen)
            + tuple(("passthrough", a) for a in self.passthrough_listen)
        )


_TOP = {
    "listen",
    "proxy_listen",
    "passthrough_listen",
    "ca_file",
    "x_forwarded_for",
    "ssrf_guard",
    "workers",
    "limits",
    "timeouts",
    "hosts",
}


def _addresses(node: Node, default_port: int, kind: str, seen: dict[Address, str]) -> tuple[Address, ...]:
    return parse_listen(node, default_port, items="addresses", what="address", ip=None, seen=seen, kind=kind)


def _positive(node: Node, what: str) -> float:
    v = node.duration(what)
    if v <= 0:
        raise node.fail(f"{what} must be more than zero")
    return v


def parse(node: Node, base: Path | None = None) -> HTTPSettings:
    """Parse the `http:` mapping. `base` is the directory relative paths resolve against (the
    node already carries it; the argument wins when given)."""
    if base is not None:
        node.base = base
    m = node.get_map(allowed=_TOP, what="http")
    kw: dict[str, object] = {}
    seen: dict[Address, str] = {}
    if "listen" in m:
        kw["listen"] = _addresses(m["listen"], 80, "transparent", seen)
    if "proxy_listen" in m:
        kw["proxy_listen"] = _addresses(m["proxy_listen"], 3128, "proxy", seen)
    if "passthrough_listen" in m:
        kw["passthrough_listen"] = _addresses(m["passthrough_listen"], 443, "passthrough", seen)
    if "ca_file" in m:
        p = m["ca_file"].path("ca_file")
        if not p.is_file():
            raise m["ca_file"].fail(f"ca_file {p} does not exist or is not a file")
        kw["ca_file"] = p
    if "x_forwarded_for" in m:
        kw["x_forwarded_for"] = m["x_forwarded_for"].bool("x_forwarded_for")
    if "ssrf_guard" in m:
        kw["ssrf_guard"] = m["ssrf_guard"].bool("ssrf_guard")
    if "workers" in m:
        kw["workers"] = m["workers"].int(min=1, max=64, what="workers")
    if "hosts" in m:
        entries = []
        for name, value in m["hosts"].get_map(what="http.hosts").items():
            ips = tuple(v.ip("address") for v in value.get_list("addresses", allow_scalar=True))
            if not ips:
                raise value.fail(f"hosts entry {name!r} has no address")
            entries.append((name.lower().rstrip("."), ips))
        kw["hosts"] = tuple(entries)
    if "limits" in m:
        lm = m["limits"].get_map(
            allowed={"header_size", "body", "stream_above", "ws_message", "connections"}, what="http.limits"
        )
        lk: dict[str, int] = {}
        for key in ("header_size", "body", "stream_above", "ws_message"):
            if key in lm:
                lk[key] = lm[key].size(key)
        if "header_size" in lk and lk["header_size"] < 1024:
            raise lm["header_size"].fail("header_size must be at least 1KiB")
        if "connections" in lm:
            lk["connections"] = lm["connections"].int(min=1, what="connections")
        kw["limits"] = LimitSettings(**lk)
    if "timeouts" in m:
        tm = m["timeouts"].get_map(allowed={"header", "idle", "dns"}, what="http.timeouts")
        kw["timeouts"] = TimeoutSettings(**{k: _positive(v, k) for k, v in tm.items()})
    settings = HTTPSettings(**kw)  # type: ignore[arg-type]
    if not settings.all_listeners:
        raise node.fail(
            "the http section has no listener",
            "set listen, proxy_listen or passthrough_listen (or remove the section to turn HTTP off)",
        )
    return settings
