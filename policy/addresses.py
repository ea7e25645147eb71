"""The one definition of an internal address: what the DNS rebinding guard and the HTTP SSRF guard
protect, and what only a rule naming the destination (a qname, a host) may let through.

Owns: `INTERNAL` (the table: network, class, why), `internal_class()` for address text and
`internal_packed()` for the packed bytes of an A/AAAA answer. Must not: know about services or
decide requests (the guards in protocols/dns and protocols/http ask this table; rules exempt).

What counts: every range from which an answer or a connection may reach something inside — the
proxy's own host (loopback, unspecified), the guests' and the hypervisor's networks (RFC 1918,
shared CGNAT space, unique-local, the benchmarking networks labs use), the local link (link-local,
cloud metadata, multicast) and ranges that are never routed (class E, IETF protocol assignments,
discard-only, deprecated IPv4-compatible and site-local IPv6). IPv4-mapped and NAT64 (64:ff9b::/96)
IPv6 addresses are judged by the IPv4 address they carry.

What does not: documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
2001:db8::/32) reach nothing anywhere, so guarding them protects nothing; they stay usable in
examples and labs. Everything else is public.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from enum import StrEnum


class AddressClass(StrEnum):
    """Why an address is internal (StrEnum: goes into audit reasons as is)."""

    METADATA = "cloud metadata"
    LOOPBACK = "loopback"
    UNSPECIFIED = "unspecified"
    LINK_LOCAL = "link-local"
    PRIVATE = "private"
    SHARED = "shared (CGNAT)"
    BENCHMARK = "benchmarking"
    MULTICAST = "multicast"
    RESERVED = "reserved"


C = AddressClass

#: The table, most specific first: (network, class, why). The only list of internal ranges.
INTERNAL: tuple[tuple[str, AddressClass, str], ...] = (
    ("169.254.169.254/32", C.METADATA, "cloud instance metadata (AWS, GCP, Azure, OpenStack)"),
    ("fd00:ec2::254/128", C.METADATA, "cloud instance metadata over IPv6 (AWS)"),
    ("0.0.0.0/8", C.UNSPECIFIED, "'this network' (RFC 791); 0.0.0.0 reaches the local host"),
    ("10.0.0.0/8", C.PRIVATE, "RFC 1918"),
    ("100.64.0.0/10", C.SHARED, "carrier-grade NAT shared space (RFC 6598)"),
    ("127.0.0.0/8", C.LOOPBACK, "loopback (RFC 1122)"),
    ("169.254.0.0/16", C.LINK_LOCAL, "link-local (RFC 3927)"),
    ("172.16.0.0/12", C.PRIVATE, "RFC 1918"),
    ("192.0.0.0/24", C.RESERVED, "IETF protocol assignments (RFC 6890)"),
    ("192.168.0.0/16", C.PRIVATE, "RFC 1918"),
    ("198.18.0.0/15", C.BENCHMARK, "benchmarking and lab networks (RFC 2544), never routed"),
    ("224.0.0.0/4", C.MULTICAST, "IPv4 multicast"),
    ("240.0.0.0/4", C.RESERVED, "class E and the limited broadcast 255.255.255.255"),
    ("::/128", C.UNSPECIFIED, "the unspecified IPv6 address"),
    ("::1/128", C.LOOPBACK, "IPv6 loopback"),
    ("::/96", C.RESERVED, "deprecated IPv4-compatible IPv6 (RFC 4291)"),
    ("64:ff9b:1::/48", C.PRIVATE, "local-use NAT64 (RFC 8215)"),
    ("100::/64", C.RESERVED, "discard-only (RFC 6666)"),
    ("fc00::/7", C.PRIVATE, "unique local (RFC 4193)"),
    ("fe80::/10", C.LINK_LOCAL, "IPv6 link-local"),
    ("fec0::/10", C.PRIVATE, "deprecated site-local (RFC 3879)"),
    ("ff00::/8", C.MULTICAST, "IPv6 multicast"),
)

#: Not internal on purpose (tests hold the table to this list too).
DOCUMENTATION = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")


def _ranges(version: int) -> tuple[tuple[int, int, AddressClass], ...]:
    out = []
    for text, cls, _why in INTERNAL:
        n = ipaddress.ip_network(text)
        if n.version == version:
            out.append((int(n.network_address), int(n.netmask), cls))
    return tuple(out)


_V4 = _ranges(4)
_V6 = _ranges(6)
_MAPPED = 0xFFFF << 32  # ::ffff:0:0/96
_NAT64 = 0x0064FF9B << 96  # 64:ff9b::/96
_LOW32 = (1 << 32) - 1


def _v4(n: int) -> AddressClass | None:
    for net, mask, cls in _V4:
        if n & mask == net:
            return cls
    return None


def _v6(n: int) -> AddressClass | None:
    if n & ~_LOW32 in (_MAPPED, _NAT64):
        return _v4(n & _LOW32)
    for net, mask, cls in _V6:
        if n & mask == net:
            return cls
    return None


def internal_packed(b: bytes) -> AddressClass | None:
    """The class of a packed IPv4 (4 bytes) or IPv6 (16 bytes) address, None when public."""
    n = int.from_bytes(b, "big")
    if len(b) == 4:
        return _v4(n)
    if len(b) == 16:
        return _v6(n)
    return C.RESERVED  # not an address: fail closed


@functools.lru_cache(maxsize=4096)
def internal_class(ip: str) -> AddressClass | None:
    """The class of an address given as text, None when public; text that is not an address is
    RESERVED (fail closed)."""
    try:
        return internal_packed(socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip))
    except (OSError, ValueError, TypeError):
        return C.RESERVED


def is_internal(ip: str) -> bool:
    return internal_class(ip) is not None


__all__ = ["DOCUMENTATION", "INTERNAL", "AddressClass", "internal_class", "internal_packed", "is_internal"]
