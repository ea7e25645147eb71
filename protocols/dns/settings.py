"""The `dns:` configuration section: typed, frozen settings and their located parser.

Owns: the schema of the `dns:` section (listeners, DoT upstreams with names and SPKI pins, CA file,
DNSSEC mode and trust anchors, cache, rebinding protection, timeouts, per-guest limits) and its
defaults.
Must not: open sockets or files other than checking that configured paths exist; there is
deliberately no setting that allows plaintext or unauthenticated upstreams.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path

from policy.source import Node, SourceError
from protocols.addr import hostport
from protocols.listen import IPOnly, parse_address, parse_listen

_PIN = re.compile(r"^sha256/([A-Za-z0-9+/]{43}=)$")


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """One DNS-over-TLS upstream: where to connect and the name its certificate must carry."""

    host: str
    port: int
    name: str  # verified against the certificate (RFC 8310 strict profile)
    pins: tuple[bytes, ...] = ()  # sha256 digests of acceptable SubjectPublicKeyInfo

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)


@dataclass(frozen=True, slots=True)
class CacheSettings:
    size: int = 100_000  # entries
    max_bytes: int = 256 * 1024 * 1024  # and bytes of stored answers (a cache of big TXT answers)
    min_ttl: int = 0
    max_ttl: int = 86_400
    negative_max_ttl: int = 3_600  # RFC 2308 §5 cap for NXDOMAIN/NODATA
    bogus_ttl: int = 30  # DNSSEC-bogus answers are remembered this long (bad cache)
    serve_stale: float = 0.0  # RFC 8767: seconds past expiry an entry may still answer; 0 = off
    stale_answer_ttl: int = 30  # TTL given to stale answers (RFC 8767 §4 recommends 30)


@dataclass(frozen=True, slots=True)
class TimeoutSettings:
    query: float = 4.0  # the guest's patience: total time to find an answer
    upstream: float = 1.5  # one attempt on one upstream before trying the next
    connect: float = 2.0  # TCP + TLS handshake
    tcp_idle: float = 10.0  # guest TCP connection idle timeout (RFC 7766 §6.2.3)
    upstream_idle: float = 30.0  # our idle close toward upstreams (unless keepalive says less)
    probe: float = 5.0  # a failed upstream is probed again after this long


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Per-guest bounds that keep one flooding or slow guest from starving the others."""

    inflight: int = 256  # concurrent upstream-bound queries per guest
    tcp_connections: int = 32  # open TCP connections per guest
    tcp_pipeline: int = 64  # queries outstanding on one TCP connection
    upstream_connections: int = 4  # TLS connections per upstream (not per guest), opened on demand
    qps: int = 0  # UDP queries per second per guest (burst: one second's worth); 0 = unlimited


DEFAULT_UPSTREAMS = (
    UpstreamSettings("9.9.9.9", 853, "dns.quad9.net"),
    UpstreamSettings("1.1.1.1", 853, "cloudflare-dns.com"),
)


@dataclass(frozen=True, slots=True)
class DNSSettings:
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 10053),)
    upstreams: tuple[UpstreamSettings, ...] = DEFAULT_UPSTREAMS
    ca_file: Path | None = None  # None: the system trust store
    dnssec: str = "validate"  # "validate" | "off"
    trust_anchors: Path | None = None  # None: built-in IANA root anchors
    cache: CacheSettings = field(default_factory=CacheSettings)
    rebinding_protection: bool = True
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    edns_udp_size: int = 1232  # the UDP payload size we advertise to guests

    @property
    def validate(self) -> bool:
        return self.dnssec == "validate"


_TOP = {
    "listen", "upstreams", "ca_file", "dnssec", "trust_anchors", "cache", "rebinding_protection",
    "timeouts", "limits", "edns_udp_size",
}


def _existing_file(node: Node, what: str) -> Path:
    p = node.path(what)
    if not p.is_file():
        raise node.fail(f"{what} {p} does not exist or is not a file")
    return p


def _check_anchors(node: Node, path: Path) -> None:
    """A trust-anchor file the validator cannot use is a config error, found by `proxyvm check`."""
    try:
        from protocols.dns.dnssec import load_anchor_file
    except ImportError:  # the validator package is not installed: start-up fails closed instead
        return
    try:
        anchors = load_anchor_file(path)
    except ValueError as e:
        raise node.fail(f"unusable trust_anchors: {e}") from None
    if not anchors:
        raise node.fail(f"trust_anchors file {path} holds no DS or DNSKEY record")


def _listen(node: Node) -> tuple[tuple[str, int], ...]:
    return parse_listen(node, 53, empty=("dns.listen is empty", "give at least one address, e.g. 127.0.0.1:10053"))


def _upstream(node: Node) -> UpstreamSettings:
    m = node.get_map(allowed={"address", "name", "pins"}, required={"address", "name"}, what="upstream")
    host, port = parse_address(m["address"], 853, what="upstream address", ip=IPOnly(
        hint="resolving it would need DNS before DNS works; put the host name in 'name'"))
    name = m["name"].str("upstream name").strip().rstrip(".").lower()
    pins: list[bytes] = []
    if "pins" in m:
        for p in m["pins"].get_list("pins", allow_scalar=True):
            text = p.str("pin").strip()
            match = _PIN.match(text)
            if not match:
                raise p.fail(f"bad pin {text!r}", "write sha256/<base64 of the SPKI SHA-256 digest>")
            pins.append(base64.b64decode(match.group(1)))
    return UpstreamSettings(host, port, name, tuple(pins))


def _cache(node: Node) -> CacheSettings:
    allowed = {"size", "max_bytes", "min_ttl", "max_ttl", "negative_max_ttl", "bogus_ttl", "serve_stale",
               "stale_answer_ttl"}
    m = node.get_map(allowed=allowed, what="dns.cache")
    d = CacheSettings()
    kw: dict[str, object] = {}
    if "size" in m:
        kw["size"] = m["size"].int(min=0, max=50_000_000, what="cache size")
    if "max_bytes" in m:
        kw["max_bytes"] = m["max_bytes"].size("cache max_bytes")
    for key in ("min_ttl", "max_ttl", "negative_max_ttl", "bogus_ttl", "stale_answer_ttl"):
        if key in m:
            v = m[key].duration(key)
            if v < 0 or v > 7 * 86400:
                raise m[key].fail(f"{key} must be between 0s and 7d")
            kw[key] = int(v)
    if "serve_stale" in m:
        n = m["serve_stale"]
        if isinstance(n.value, bool):
            kw["serve_stale"] = 86400.0 if n.value else 0.0  # true: RFC 8767's suggested 1 day
        else:
            kw["serve_stale"] = n.duration("serve_stale")
    out = CacheSettings(**{**{f: getattr(d, f) for f in d.__slots__}, **kw})  # type: ignore[arg-type]
    if out.min_ttl > out.max_ttl:
        raise m.get("min_ttl", node).fail("min_ttl is larger than max_ttl")
    return out


def _timeouts(node: Node) -> TimeoutSettings:
    d = TimeoutSettings()
    m = node.get_map(allowed=set(d.__slots__), what="dns.timeouts")
    kw = {}
    for key, n in m.items():
        v = n.duration(key)
        if not 0.01 <= v <= 3600:
            raise n.fail(f"timeout {key} must be between 10ms and 1h")
        kw[key] = v
    out = TimeoutSettings(**{**{f: getattr(d, f) for f in d.__slots__}, **kw})
    if out.upstream > out.query:
        raise m.get("upstream", node).fail("timeouts.upstream is longer than timeouts.query")
    return out


def _limits(node: Node) -> LimitSettings:
    d = LimitSettings()
    m = node.get_map(allowed=set(d.__slots__), what="dns.limits")
    kw = {k: n.int(min=0 if k == "qps" else 1, max=1_000_000, what=k) for k, n in m.items()}
    return LimitSettings(**{**{f: getattr(d, f) for f in d.__slots__}, **kw})


def parse(node: Node, base: Path) -> DNSSettings:
    """Parse the `dns:` section (a located Node) into DNSSettings; SourceError on any problem."""
    if node.value is None:
        return DNSSettings()
    m = node.get_map(allowed=_TOP, what="dns")
    kw: dict[str, object] = {}
    problems = []
    for key, fn in (
        ("listen", _listen),
        ("cache", _cache),
        ("timeouts", _timeouts),
        ("limits", _limits),
    ):
        if key in m:
            try:
                kw[key] = fn(m[key])
            except SourceError as e:
                problems.extend(e.problems)
    if "upstreams" in m:
        ups = []
        items = m["upstreams"].get_list("upstreams")
        if not items:
            problems.append(m["upstreams"].problem("dns.upstreams is empty", "list at least one DoT upstream"))
        for item in items:
            try:
                ups.append(_upstream(item))
            except SourceError as e:
                problems.extend(e.problems)
        kw["upstreams"] = tuple(ups)
    try:
        if "ca_file" in m:
            kw["ca_file"] = _existing_file(m["ca_file"], "ca_file")
        if "trust_anchors" in m:
            kw["trust_anchors"] = _existing_file(m["trust_anchors"], "trust_anchors")
            _check_anchors(m["trust_anchors"], kw["trust_anchors"])  # type: ignore[arg-type]
        if "dnssec" in m:
            n = m["dnssec"]
            if n.value is False:
                kw["dnssec"] = "off"
            elif n.value is True:
                kw["dnssec"] = "validate"
            else:
                kw["dnssec"] = n.enum(["validate", "off"], "dnssec mode")
        if "rebinding_protection" in m:
            kw["rebinding_protection"] = m["rebinding_protection"].bool("rebinding_protection")
        if "edns_udp_size" in m:
            kw["edns_udp_size"] = m["edns_udp_size"].int(min=512, max=4096, what="edns_udp_size")
    except SourceError as e:
        problems.extend(e.problems)
    if problems:
        raise SourceError(problems)
    return DNSSettings(**kw)  # type: ignore[arg-type]
